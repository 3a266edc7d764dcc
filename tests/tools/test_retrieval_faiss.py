"""faiss backend with the packaged MiniLM encoder (offline): exact search, index types, resume, prebuilt
Search-R1 layout, and the errors a misconfigured index must give."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("faiss")

from tepo_ray.data.corpus import generate_single_hop_questions, generate_world, parse_contents, write_corpus  # noqa: E402
from tepo_ray.tools.retrieval import IndexBuildError, IndexCorruptError, build_index, open_retriever  # noqa: E402
from tepo_ray.tools.retrieval.dense_faiss import (DenseEncoder, DimensionMismatchError, import_prebuilt,  # noqa: E402
                                                  index_memory_bytes)

N_DOCS = 120


@pytest.fixture(scope="module")
def world():
    return generate_world(num_docs=N_DOCS, seed=7)


@pytest.fixture(scope="module")
def flat(tmp_path_factory, world):
    d = tmp_path_factory.mktemp("faiss")
    write_corpus(d / "corpus.jsonl", world.docs)
    report = build_index(d / "corpus.jsonl", d / "flat", backend="faiss", progress=False,
                         writer_options={"encode_batch": 32})
    assert report.num_docs == N_DOCS
    return d


@pytest.fixture(scope="module")
def encoder():
    return DenseEncoder(None)


def test_flat_equals_brute_force_over_the_same_encoder(flat, world, encoder) -> None:
    """Top-k ids and scores of the faiss Flat index = numpy inner products of independently encoded vectors."""
    passages = [f"{t}\n{x}" for t, x in (parse_contents(d["contents"]) for d in world.docs)]
    P = encoder.encode(passages, kind="passage")  # [N, dim]
    qs = [q["question"] for q in generate_single_hop_questions(world, n=20, seed=2)]
    Q = encoder.encode(qs, kind="query")  # [B, dim]
    S = Q @ P.T  # [B, N]
    with open_retriever(flat / "flat", backend="faiss") as r:
        hits = r.search(qs, top_k=3)
    for b, hh in enumerate(hits):
        want = np.argsort(-S[b])[:3]
        np.testing.assert_allclose([h.score for h in hh], S[b, want], atol=2e-5)
        assert hh[0].doc_id == world.docs[want[0]]["id"] or abs(S[b, want[0]] - S[b, want[1]]) < 1e-5


def test_planted_documents_are_found(flat, world) -> None:
    qs = generate_single_hop_questions(world, n=40, seed=5)
    with open_retriever(flat / "flat") as r:
        hits = r.search([q["question"] for q in qs], top_k=3)
    recall = np.mean([q["hops"][0] in [h.doc_id for h in hh] for q, hh in zip(qs, hits)])
    assert recall >= 0.8, recall


@pytest.mark.parametrize("index_type,opts", [
    ("HNSW", {"hnsw_m": 8}),
    pytest.param("IVF-PQ", {"nlist": 2, "pq_nbits": 4}, marks=pytest.mark.slow),  # PQ training: ~10 s
])
def test_other_index_types_reuse_the_embeddings(tmp_path, flat, world, index_type, opts) -> None:
    shutil.copytree(flat / "flat", tmp_path / "ix")
    emb = tmp_path / "ix" / "faiss" / "embeddings.f32"
    stamp = emb.stat().st_mtime_ns
    report = build_index(flat / "corpus.jsonl", tmp_path / "ix", backend="faiss", progress=False,
                         writer_options={"index_type": index_type, **opts})
    assert report.rebuilt and emb.stat().st_mtime_ns == stamp  # index rebuilt, nothing re-embedded
    qs = [q["question"] for q in generate_single_hop_questions(world, n=30, seed=4)]
    with open_retriever(flat / "flat") as exact, open_retriever(tmp_path / "ix", nprobe=2, ef_search=64) as approx:
        assert json.loads((tmp_path / "ix" / "manifest.json").read_text())["index_type"] == index_type
        a, b = exact.search(qs, top_k=3), approx.search(qs, top_k=3)
    overlap = np.mean([len({h.doc_id for h in x} & {h.doc_id for h in y}) / 3 for x, y in zip(a, b)])
    assert overlap >= (0.9 if index_type == "HNSW" else 0.5), overlap


_KILL_AFTER_64 = """
import os, signal, sys
from tepo_ray.tools.retrieval import build_index
from tepo_ray.tools.retrieval.dense_faiss import FaissWriter

def kill_self(rows):  # fault injection: hard kill right after 64 passages are embedded
    if rows >= 64:
        os.kill(os.getpid(), signal.SIGKILL)

FaissWriter.on_chunk = kill_self
build_index(sys.argv[1], sys.argv[2], backend="faiss", progress=False, writer_options={"encode_batch": 32})
"""


@pytest.mark.slow  # a fresh process imports sentence-transformers (~10-30 s here)
def test_killed_embedding_resumes_after_last_chunk(tmp_path, flat, monkeypatch) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path.cwd()), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-c", _KILL_AFTER_64, str(flat / "corpus.jsonl"), str(tmp_path / "ix")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    dim = 384
    assert (tmp_path / "ix" / "faiss" / "embeddings.f32").stat().st_size == 64 * dim * 4

    from tepo_ray.tools.retrieval.dense_faiss import FaissWriter

    seen: list[int] = []
    monkeypatch.setattr(FaissWriter, "on_chunk", seen.append)
    build_index(flat / "corpus.jsonl", tmp_path / "ix", backend="faiss", progress=False,
                writer_options={"encode_batch": 32})
    assert seen == [96, N_DOCS]  # resumed at passage 64: only the rest was embedded
    a = np.fromfile(tmp_path / "ix" / "faiss" / "embeddings.f32", dtype=np.float32)
    b = np.fromfile(flat / "flat" / "faiss" / "embeddings.f32", dtype=np.float32)
    np.testing.assert_allclose(a, b, atol=1e-5)


def _search_r1_dir(tmp_path: Path, flat: Path) -> Path:
    """A directory laid out like Search-R1's retriever data: e5_Flat.index + wiki-18.jsonl."""
    import faiss

    d = tmp_path / "search_r1"
    d.mkdir()
    vecs = np.fromfile(flat / "flat" / "faiss" / "embeddings.f32", dtype=np.float32).reshape(N_DOCS, -1)
    index = faiss.IndexFlatIP(vecs.shape[1])
    index.add(vecs)
    faiss.write_index(index, str(d / "e5_Flat.index"))
    shutil.copy(flat / "corpus.jsonl", d / "wiki-18.jsonl")
    return d


def test_prebuilt_search_r1_layout_is_served_without_rebuilding(tmp_path, flat, world) -> None:
    d = _search_r1_dir(tmp_path, flat)
    manifest = import_prebuilt(d / "e5_Flat.index", d / "wiki-18.jsonl", d)
    assert manifest["num_docs"] == N_DOCS and manifest["prebuilt"]["index_file"].endswith("e5_Flat.index")
    assert not (d / "store.sqlite").exists()  # passages are read from wiki-18.jsonl by line offset
    qs = [q["question"] for q in generate_single_hop_questions(world, n=20, seed=8)]
    with open_retriever(d) as pre, open_retriever(flat / "flat") as own:
        assert pre.search(qs, top_k=3) == own.search(qs, top_k=3)


def test_prebuilt_count_mismatch_is_refused(tmp_path, flat) -> None:
    d = _search_r1_dir(tmp_path, flat)
    with open(d / "wiki-18.jsonl", "a") as f:
        f.write(json.dumps({"id": "extra", "contents": '"Extra"\nOne passage too many.'}) + "\n")
    with pytest.raises(IndexBuildError, match=f"holds {N_DOCS} vectors but .*wiki-18.jsonl has more than {N_DOCS}"):
        import_prebuilt(d / "e5_Flat.index", d / "wiki-18.jsonl", d)


def test_dimension_mismatch_names_the_fix(tmp_path, flat) -> None:
    import faiss

    d = tmp_path / "e5"
    d.mkdir()
    index = faiss.IndexFlatIP(768)  # e5-base-v2's dimension; the packaged encoder gives 384
    index.add(np.random.default_rng(0).standard_normal((N_DOCS, 768)).astype(np.float32))
    faiss.write_index(index, str(d / "e5_Flat.index"))
    shutil.copy(flat / "corpus.jsonl", d / "wiki-18.jsonl")
    import_prebuilt(d / "e5_Flat.index", d / "wiki-18.jsonl", d)
    with pytest.raises(DimensionMismatchError, match="384-dim vectors but .*768-dim.*tools.search.embedding_model"):
        open_retriever(d)


def test_corrupt_and_missing_index_file(tmp_path, flat) -> None:
    shutil.copytree(flat / "flat", tmp_path / "ix")
    path = tmp_path / "ix" / "faiss" / "index.faiss"
    os.truncate(path, path.stat().st_size // 3)
    with pytest.raises(IndexCorruptError, match="index.faiss is not a readable faiss index"):
        open_retriever(tmp_path / "ix")
    path.unlink()
    with pytest.raises(IndexCorruptError.__mro__[1], match="index.faiss is missing"):
        open_retriever(tmp_path / "ix")


def test_memory_sizing_for_wiki18() -> None:
    n, dim = 21_015_324, 768
    assert index_memory_bytes("Flat", num_docs=n, dim=dim) == n * dim * 4  # 64.6 GB
    assert index_memory_bytes("HNSW", num_docs=n, dim=dim) > index_memory_bytes("Flat", num_docs=n, dim=dim)
    assert index_memory_bytes("IVF-PQ", num_docs=n, dim=dim) < 3 * 2**30
