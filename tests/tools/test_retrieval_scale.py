"""BM25 at scale: sharded build resumes after a kill, searching during a rebuild, corrupt/missing files,
and the exact wiki-18 record format through every backend to the observation Search-R1 models expect."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tepo_ray.data.corpus import generate_single_hop_questions, generate_world, write_corpus
from tepo_ray.tools.retrieval import (NO_RESULTS, IndexCorruptError, IndexNotFoundError, build_index,
                                      open_retriever)
from tepo_ray.tools.retrieval.bm25 import BM25Writer

_KILL_AT_SHARD = """
import os, signal, sys
from tepo_ray.tools.retrieval import build_index
from tepo_ray.tools.retrieval.bm25 import BM25Writer

def kill_self(i):  # fault injection: hard kill (no cleanup) right after shard 2 is saved
    if i == 2:
        os.kill(os.getpid(), signal.SIGKILL)

BM25Writer.on_shard = kill_self
build_index(sys.argv[1], sys.argv[2], progress=False, writer_options={"shard_docs": 40})
"""


def test_killed_sharded_build_resumes_at_first_unfinished_shard(tmp_path, monkeypatch) -> None:
    world = generate_world(num_docs=300, seed=5)
    write_corpus(tmp_path / "c.jsonl", world.docs)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path.cwd()), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-c", _KILL_AT_SHARD, str(tmp_path / "c.jsonl"), str(tmp_path / "ix")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == -signal.SIGKILL, res.stderr
    done = sorted(p.name for p in (tmp_path / "ix" / "bm25.shards").glob("shard_*") if (p / "done.json").is_file())
    assert done == ["shard_00000", "shard_00001", "shard_00002"]
    with pytest.raises(IndexNotFoundError):
        open_retriever(tmp_path / "ix")  # no manifest yet: not servable

    built: list[int] = []
    monkeypatch.setattr(BM25Writer, "on_shard", built.append)
    report = build_index(tmp_path / "c.jsonl", tmp_path / "ix", progress=False, writer_options={"shard_docs": 40})
    assert report.num_docs == 300 and report.rebuilt
    assert built == [3, 4, 5, 6, 7]  # 300 docs / 40 per shard = 8 shards; 0..2 were kept

    monkeypatch.setattr(BM25Writer, "on_shard", None)
    build_index(tmp_path / "c.jsonl", tmp_path / "clean", progress=False, writer_options={"shard_docs": 40})
    for name in ("data.csc.index.npy", "indices.csc.index.npy", "indptr.csc.index.npy", "vocab_hashes.npy"):
        assert np.array_equal(np.load(tmp_path / "ix" / "bm25" / name), np.load(tmp_path / "clean" / "bm25" / name))


def test_search_while_rebuilding_keeps_answering(tmp_path) -> None:
    """An open retriever keeps serving its (unlinked) mapped files while the index is rebuilt in place."""
    world = generate_world(num_docs=400, seed=2)
    write_corpus(tmp_path / "c.jsonl", world.docs[:300])
    build_index(tmp_path / "c.jsonl", tmp_path / "ix", progress=False, writer_options={"shard_docs": 64})
    qs = [q["question"] for q in generate_single_hop_questions(world, n=40, seed=3)]
    with open_retriever(tmp_path / "ix") as old:
        before = old.search(qs, top_k=3)
        with open(tmp_path / "c.jsonl", "a") as f:  # the corpus grows; rebuild into the same directory
            for d in world.docs[300:]:
                f.write(json.dumps(d) + "\n")
        report = build_index(tmp_path / "c.jsonl", tmp_path / "ix", progress=False, writer_options={"shard_docs": 64})
        assert report.added == 100 and report.rebuilt
        assert old.search(qs, top_k=3) == before  # same answers from the old generation, no crash
    with open_retriever(tmp_path / "ix") as new:
        assert new.num_docs == 400
        new_ids = {d["id"] for d in world.docs[300:]}
        hits = new.search([q for q in qs], top_k=3)
        assert any(h.doc_id in new_ids for hh in hits for h in hh)


@pytest.fixture()
def small_index(tmp_path):
    world = generate_world(num_docs=120, seed=1)
    write_corpus(tmp_path / "c.jsonl", world.docs)
    build_index(tmp_path / "c.jsonl", tmp_path / "ix", progress=False)
    return tmp_path / "ix"


def test_truncated_matrix_is_a_clear_error(small_index) -> None:
    path = small_index / "bm25" / "data.csc.index.npy"
    os.truncate(path, path.stat().st_size // 2)
    with pytest.raises(IndexCorruptError, match="data.csc.index.npy.*rebuild"):
        open_retriever(small_index)


def test_garbage_matrix_file_is_a_clear_error(small_index) -> None:
    (small_index / "bm25" / "indptr.csc.index.npy").write_bytes(b"not a numpy file at all")
    with pytest.raises(IndexCorruptError, match="indptr.csc.index.npy is corrupt"):
        open_retriever(small_index)


def test_missing_matrix_file_is_a_clear_error(small_index) -> None:
    (small_index / "bm25" / "vocab_hashes.npy").unlink()
    with pytest.raises(IndexNotFoundError, match="vocab_hashes.npy is missing.*index build"):
        open_retriever(small_index)


# --------------------------------------------------------------------------- exact wiki-18 records
# Lines as they appear in Search-R1's wiki-18.jsonl: a quoted title line, then the passage text.
WIKI18_LINES = [
    {"id": "1", "contents": "\"Aaron\"\nAaron Aaron ( or ; \"Ahärôn\") is a prophet, high priest, and the brother of "
                            "Moses in the Abrahamic religions. Knowledge of Aaron, along with his brother Moses, "
                            "comes exclusively from religious texts, such as the Bible and Quran."},
    {"id": "2", "contents": "\"Aaron\"\nthe Hebrew Bible relates that, unlike Moses, who grew up in the Egyptian "
                            "royal court, Aaron and his elder sister Miriam remained with their kinsmen in the "
                            "eastern border-land of Egypt (Goshen)."},
    {"id": "3", "contents": "\"Zinc oxide\"\nZinc oxide is an inorganic compound with the formula ZnO. It is a "
                            "white powder that is insoluble in water, and it is widely used as an additive in "
                            "rubbers, plastics, ceramics, glass and cement."},
    {"id": "4", "contents": "\"Kraków\"\nKraków is the second-largest and one of the oldest cities in Poland. "
                            "Situated on the Vistula River in Lesser Poland, the city dates back to the 7th century."},
    {"id": "5", "contents": "\"Photosynthesis\"\nPhotosynthesis is a process used by plants and other organisms to "
                            "convert light energy into chemical energy that can later be released to fuel the "
                            "organisms' activities."},
]


@pytest.mark.parametrize("backend", ["bm25", pytest.param("faiss", marks=pytest.mark.slow),
                                     pytest.param("chroma", marks=pytest.mark.slow)])
def test_wiki18_records_through_each_backend_to_search_r1_observations(tmp_path, backend) -> None:
    from actors.tool_pool import SearchToolWorker
    from tepo_ray.config import SearchToolConfig

    corpus = tmp_path / "wiki-18.jsonl"
    corpus.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in WIKI18_LINES), encoding="utf-8")
    build_index(corpus, tmp_path / "ix", backend=backend, progress=False)
    cfg = SearchToolConfig(backend=backend, index_dir=str(tmp_path / "ix"), top_k=2, max_doc_chars=60)
    worker = SearchToolWorker(cfg, max_observation_chars=1000)
    try:
        obs = worker.execute("What is the chemical formula of zinc oxide?", 5.0).observation
        lines = obs.split("\n")
        assert len(lines) == 2
        assert lines[0].startswith('Doc 1(Title: "Zinc oxide") Zinc oxide is an inorganic compound')
        assert lines[1].startswith('Doc 2(Title: "')
        body = lines[0][len('Doc 1(Title: "Zinc oxide") '):]
        assert len(body) == 60 and body.endswith("...")  # cut at max_doc_chars
        obs = worker.execute("Which city lies on the Vistula River?", 5.0).observation
        assert obs.startswith('Doc 1(Title: "Kraków") Kraków is the second-largest')
        assert worker.execute("   ", 5.0).observation == NO_RESULTS
    finally:
        worker.close()
