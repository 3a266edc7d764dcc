"""One named, detached search service shared by several runs (`tools.search.service`), on a real local Ray."""

from __future__ import annotations

import pytest

from tepo_ray.config import load_config

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def small_index(tmp_path_factory):
    from tepo_ray.data.corpus import generate_corpus, write_corpus
    from tepo_ray.tools.retrieval import build_index

    root = tmp_path_factory.mktemp("service")
    docs = generate_corpus(num_docs=40, seed=5)
    write_corpus(root / "corpus.jsonl", docs)
    build_index(root / "corpus.jsonl", root / "index", backend="bm25")
    return docs, str(root / "index")


def test_runs_share_one_named_search_service(ray_local, small_index) -> None:
    import ray

    from tepo_ray.data.corpus import parse_contents
    from tepo_ray.tool_pools import owned_pools, start_service, start_tool_pools, stop_service
    from tepo_ray.topology import needs_search

    docs, index_dir = small_index
    base = [f"tools.search.index_dir={index_dir}", "tools.search.workers=1", "tools.python.workers=1",
            "data.task=multihop"]
    with pytest.raises(ValueError, match=r"tools\.search\.service='absent'.*tepo-ray tools serve"):
        start_tool_pools(load_config([], [*base, "tools.search.service=absent"]), index_dir=None)

    service = start_service(load_config([], base), "search", name="shared-search", index_dir=index_dir)
    run_cfg = load_config([], [*base, "tools.search.service=shared-search"])
    assert not needs_search(run_cfg)  # a run with a service reserves no search bundle of its own
    run_a = start_tool_pools(run_cfg, index_dir=None)
    run_b = start_tool_pools(run_cfg, index_dir=None)
    try:
        assert run_a["search"]._actor_id == run_b["search"]._actor_id == service._actor_id
        assert set(owned_pools(run_cfg, run_a)) == {"python"}  # the service is not the run's to shut down
        title = parse_contents(docs[3]["contents"])[0]
        obs_a, obs_b = ray.get([run_a["search"].call.remote(title), run_b["search"].call.remote(title)])
        assert obs_a.observation == obs_b.observation and f'(Title: "{title}")' in obs_a.observation
        for pools in (run_a, run_b):  # both runs end; the service keeps answering
            for h in owned_pools(run_cfg, pools).values():
                ray.get(h.shutdown.remote())
                ray.kill(h)
        assert ray.get(service.call.remote(title)).error is None
        again = start_service(load_config([], base), "search", name="shared-search", index_dir=index_dir)
        assert again._actor_id == service._actor_id  # serve is idempotent: get_if_exists
    finally:
        assert stop_service("shared-search")
    assert not stop_service("shared-search")
    with pytest.raises(ValueError, match="no such service"):
        start_tool_pools(run_cfg, index_dir=None)
