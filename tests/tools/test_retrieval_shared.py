"""One index per node: 4 search worker actors share one copy of the memory-mapped bm25 index.

Measured from outside the workers with psutil: for the mappings of the index files, each worker's
RSS is the whole index (every page is mapped in), while the PSS summed over the 4 workers -- each
shared page divided among the processes mapping it -- is one index, not four. A worker that copied
the arrays into its own memory would have no such mappings (and 4x the private memory): the test
fails then.
"""

from __future__ import annotations

import random

import pytest

psutil = pytest.importorskip("psutil")

from tepo_ray.data.corpus import generate_single_hop_questions, generate_world, write_corpus  # noqa: E402
from tepo_ray.tools.retrieval import build_index  # noqa: E402

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray with 2 CPUs (tests/actors/conftest.py's fixture is not visible from tests/tools)."""
    import os

    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, configure_logging=True, logging_level="WARNING",
                 object_store_memory=int(os.environ.get("TEPO_TEST_OBJECT_STORE_MB", "512")) * 2**20)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def big_index(tmp_path_factory):
    """~12 MB of index: 12k passages of ~100 words (planted entity facts + random filler words)."""
    world = generate_world(num_docs=12_000, seed=21)
    rng = random.Random(0)
    filler = [f"w{i}x" for i in range(40_000)]
    docs = [{"id": d["id"], "contents": d["contents"] + " " + " ".join(rng.choices(filler, k=80))} for d in world.docs]
    root = tmp_path_factory.mktemp("shared")
    write_corpus(root / "c.jsonl", docs)
    build_index(root / "c.jsonl", root / "ix", progress=False)
    return world, root / "ix"


def _index_maps(pid: int, index_dir) -> tuple[int, int]:
    """(rss, pss) in bytes of the process's mappings of files under ``index_dir``/bm25."""
    rss = pss = 0
    prefix = str((index_dir / "bm25").resolve())
    for m in psutil.Process(pid).memory_maps(grouped=True):
        if m.path.startswith(prefix):
            rss += m.rss
            pss += m.pss
    return rss, pss


def test_four_workers_share_one_index(ray_local, big_index) -> None:
    import ray

    from actors.tool_pool import ToolPool
    from tepo_ray.config import RoleResources, SearchToolConfig, ToolsConfig

    world, index_dir = big_index
    index_bytes = sum(p.stat().st_size for p in (index_dir / "bm25").glob("*.npy"))
    assert index_bytes > 8 * 2**20
    tools = ToolsConfig(search=SearchToolConfig(workers=4, min_workers=4, max_workers=4, index_dir=str(index_dir),
                                                top_k=3, preload=True), max_observation_chars=2000)
    with ToolPool.from_config("search", tools, RoleResources(num_cpus=0.25), health_interval_s=0) as pool:
        stats = pool.worker_stats()
        pids = sorted({s["pid"] for s in stats})
        assert len(pids) == 4
        maps = [_index_maps(pid, index_dir) for pid in pids]
        for rss, _ in maps:  # every worker maps the whole index ...
            assert rss >= 0.9 * index_bytes, (rss, index_bytes)
        total_rss = sum(r for r, _ in maps)
        total_pss = sum(p for _, p in maps)
        # ... and it is resident once: PSS over the 4 workers ~ one index (x4 if each had its own copy).
        assert total_pss <= 1.15 * index_bytes, (total_pss, index_bytes)
        print(f"index files {index_bytes} B; per-worker index RSS {[r for r, _ in maps]}; PSS sum {total_pss}")
        assert total_rss >= 3.6 * index_bytes

        qs = [q["question"] for q in generate_single_hop_questions(world, n=12, seed=3)] + ["", "zzqq"]
        answers = [ray.get([h.execute.remote(q, 5.0) for q in qs]) for h in pool.worker_handles()]
        obs = [[r.observation for r in a] for a in answers]
        assert all(o == obs[0] for o in obs[1:])  # all 4 workers answer identically
        assert obs[0][0].startswith("Doc 1(Title: ") and obs[0][-2] == "No results found."
