"""BM25 retrieval on a real index over a generated corpus: ranking, batching, scorers, format_hits, errors."""

from __future__ import annotations

import numpy as np
import pytest

from tepo_ray.data.corpus import (World, generate_multihop_questions, generate_single_hop_questions, generate_world,
                                  parse_contents, write_corpus)
from tepo_ray.tools.retrieval import (NO_RESULTS, Hit, IndexNotFoundError, build_index, format_hits, get_backend,
                                      open_retriever)
from tepo_ray.tools.retrieval.bm25 import BM25Retriever, numba_available, tokenize

TOP_K = 3


@pytest.fixture(scope="module")
def world() -> World:
    return generate_world(num_docs=400, seed=11)


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, world: World):
    d = tmp_path_factory.mktemp("bm25")
    write_corpus(d / "corpus.jsonl", world.docs)
    report = build_index(d / "corpus.jsonl", d / "index", progress=False, batch_size=128)
    assert report.num_docs == 400 and report.bad_lines_total == 0
    return d / "index"


@pytest.fixture(scope="module")
def retriever(index_dir):
    r = open_retriever(index_dir, backend="bm25")
    yield r
    r.close()


def _recall(retriever, queries: list[str], targets: list[str]) -> float:
    results = retriever.search(queries, top_k=TOP_K)
    return float(np.mean([t in [h.doc_id for h in hits] for t, hits in zip(targets, results)]))


def test_entity_name_query_finds_its_document(retriever, world: World) -> None:
    titles = [parse_contents(d["contents"])[0] for d in world.docs]
    results = retriever.search(titles, top_k=TOP_K)
    at_1 = np.mean([hits[0].doc_id == d["id"] for d, hits in zip(world.docs, results)])
    at_k = np.mean([d["id"] in [h.doc_id for h in hits] for d, hits in zip(world.docs, results)])
    assert at_k >= 0.95, at_k
    assert at_1 >= 0.9, at_1


def test_question_recall(retriever, world: World) -> None:
    single = generate_single_hop_questions(world, n=80, seed=1)
    multi = generate_multihop_questions(world, n=80, seed=2)
    chance = TOP_K / len(world.docs)
    r_single = _recall(retriever, [q["question"] for q in single], [q["hops"][0] for q in single])
    r_hop1 = _recall(retriever, [q["question"] for q in multi], [q["hops"][0] for q in multi])
    # Second hop: the agent searches the bridge entity it read in the first document.
    bridge = [parse_contents(world.docs[int(q["hops"][1])]["contents"])[0] for q in multi]
    r_hop2 = _recall(retriever, bridge, [q["hops"][1] for q in multi])
    assert min(r_single, r_hop1, r_hop2) >= 0.9, (r_single, r_hop1, r_hop2)
    assert r_single > 100 * chance


def test_hits_are_sorted_and_carry_document_fields(retriever, world: World) -> None:
    hits = retriever.search(["Who founded a company in a city"], top_k=5)[0]
    assert len(hits) == 5
    assert all(a.score >= b.score > 0 for a, b in zip(hits, hits[1:]))
    for h in hits:
        assert (h.title, h.text) == parse_contents(world.docs[int(h.doc_id)]["contents"])


def test_batched_equals_one_by_one(retriever, world: World) -> None:
    qs = [q["question"] for q in generate_multihop_questions(world, n=40, seed=5)]
    assert retriever.search(qs, top_k=TOP_K) == [retriever.search([q], top_k=TOP_K)[0] for q in qs]


def test_matches_bm25s_one_shot_index(index_dir, retriever, world: World) -> None:
    """The sharded build's scores against bm25s's own one-shot index of the same corpus (independent code)."""
    import bm25s

    vocab: dict[str, int] = {}
    corpus_ids = [[vocab.setdefault(t, len(vocab)) for t in tokenize(d["contents"])] for d in world.docs]
    ref = bm25s.BM25()
    ref.index((corpus_ids, vocab), create_empty_token=False, show_progress=False)
    qs = [q["question"] for q in generate_single_hop_questions(world, n=30, seed=9)] + ["city founded", "born"]
    ours = retriever.search(qs, top_k=TOP_K)
    for q, hits in zip(qs, ours):
        scores = ref.get_scores([vocab[t] for t in tokenize(q) if t in vocab])  # [num_docs]
        top = np.sort(scores)[::-1][:TOP_K]
        np.testing.assert_allclose([h.score for h in hits], top, rtol=1e-6)
        for h in hits:  # each hit's score is bm25s's score of that very document
            j = next(i for i, d in enumerate(world.docs) if d["id"] == h.doc_id)
            assert abs(scores[j] - h.score) <= 1e-6 * max(1.0, abs(h.score))


def test_sharded_build_equals_single_shard(tmp_path, index_dir, world: World) -> None:
    """Many tiny shards and merge blocks give exactly the matrix of one shard."""
    import os

    write_corpus(tmp_path / "corpus.jsonl", world.docs)
    build_index(tmp_path / "corpus.jsonl", tmp_path / "ix", progress=False, batch_size=128,
                writer_options={"shard_docs": 37, "block_postings": 500})
    for name in ("data.csc.index.npy", "indices.csc.index.npy", "indptr.csc.index.npy", "vocab_hashes.npy",
                 "rowids.npy"):
        a = np.load(index_dir / "bm25" / name)
        b = np.load(tmp_path / "ix" / "bm25" / name)
        assert a.dtype == b.dtype and np.array_equal(a, b), name
    assert not os.path.exists(tmp_path / "ix" / "bm25.shards")  # work files removed once the matrix is in place


def test_threaded_batches_equal_single_thread(index_dir, retriever, world: World) -> None:
    qs = [q["question"] for q in generate_single_hop_questions(world, n=37, seed=6)]
    with BM25Retriever(index_dir, num_threads=2) as threaded:
        assert threaded.search(qs, top_k=TOP_K) == retriever.search(qs, top_k=TOP_K)


@pytest.mark.skipif(not numba_available(), reason="numba not installed")
def test_numba_and_numpy_scorers_agree(index_dir, world: World) -> None:
    qs = [q["question"] for q in generate_multihop_questions(world, n=60, seed=4)] + ["city", "zzzz qqqq", "born born born"]
    with BM25Retriever(index_dir, scorer="numba") as a, BM25Retriever(index_dir, scorer="numpy") as b:
        assert a.scorer == "numba" and b.scorer == "numpy"
        assert a.search(qs, top_k=7) == b.search(qs, top_k=7)


def test_queries_matching_nothing(retriever) -> None:
    assert retriever.search(["", "   ", "qqqqzzzz xxyyxx", "the of and"], top_k=3) == [[], [], [], []]
    assert retriever.search([], top_k=3) == []


def test_top_k_larger_than_corpus(retriever, world: World) -> None:
    hits = retriever.search(["city"], top_k=10_000)[0]
    n_city_docs = sum("city" in tokenize(d["contents"]) for d in world.docs)
    assert len(hits) == n_city_docs
    assert len({h.doc_id for h in hits}) == len(hits)


def test_search_rejects_bad_input(retriever) -> None:
    with pytest.raises(TypeError, match="list of strings"):
        retriever.search("a single string", top_k=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"queries\[1\]"):
        retriever.search(["ok", 3], top_k=3)  # type: ignore[list-item]
    with pytest.raises(ValueError, match="top_k"):
        retriever.search(["ok"], top_k=0)


def test_open_retriever_errors(tmp_path, index_dir) -> None:
    with pytest.raises(IndexNotFoundError, match="tepo-ray index build"):
        open_retriever(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(IndexNotFoundError, match="manifest.json"):
        open_retriever(tmp_path / "empty")
    with pytest.raises(ValueError, match="'bm25'.*'chroma'"):
        open_retriever(index_dir, backend="chroma")


def test_unknown_backend_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown retrieval backend 'annoy'; valid: \['bm25', 'chroma', 'faiss'\]"):
        get_backend("annoy")


# --------------------------------------------------------------------------- format_hits
def _hit(i: int, text: str) -> Hit:
    return Hit(doc_id=str(i), title=f"T{i}", text=text, score=1.0 / (i + 1))


def test_format_hits_search_r1_layout() -> None:
    out = format_hits([_hit(0, "alpha beta"), _hit(1, "gamma\ndelta")], max_chars=100)
    assert out == 'Doc 1(Title: "T0") alpha beta\nDoc 2(Title: "T1") gamma delta'


def test_format_hits_truncates_each_text() -> None:
    long = "word " * 200
    out = format_hits([_hit(0, long), _hit(1, "short")], max_chars=50)
    first, second = out.split("\n")
    body = first[len('Doc 1(Title: "T0") '):]
    assert len(body) <= 50 and body.endswith("...")
    assert long.startswith(body[:-3])
    assert second == 'Doc 2(Title: "T1") short'
    exact = "x" * 50
    assert format_hits([_hit(0, exact)], max_chars=50).endswith(exact)  # not cut at exactly max_chars


def test_format_hits_empty_and_bad_max_chars() -> None:
    assert format_hits([], max_chars=100) == NO_RESULTS
    with pytest.raises(ValueError, match="max_chars"):
        format_hits([_hit(0, "x")], max_chars=0)


def test_format_hits_on_real_hits(retriever, world: World) -> None:
    title = parse_contents(world.docs[5]["contents"])[0]
    out = format_hits(retriever.search([title], top_k=TOP_K)[0], max_chars=40)
    lines = out.split("\n")
    assert len(lines) == TOP_K and lines[0].startswith(f'Doc 1(Title: "{title}") ')
