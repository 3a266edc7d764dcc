"""Streaming index builds: bad lines with line numbers, idempotent re-runs, resume after faults/kills, CLI."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tepo_ray.data.corpus import generate_corpus, parse_contents, write_corpus
from tepo_ray.tools.retrieval import BatchEvent, IndexBuildError, build_index, open_retriever, read_manifest

CLI = [sys.executable, "-m", "tepo_ray.tools.retrieval.cli"]


class InjectedFault(RuntimeError):
    pass


class FaultInjectingHook:
    """`on_batch` hook that raises at a given batch and phase, simulating a crash mid-build."""

    def __init__(self, *, batch_index: int, phase: str) -> None:
        self.batch_index, self.phase = batch_index, phase
        self.events: list[BatchEvent] = []

    def __call__(self, event: BatchEvent) -> None:
        self.events.append(event)
        if event.batch_index == self.batch_index and event.phase == self.phase:
            raise InjectedFault(f"injected at batch {event.batch_index} ({event.phase})")


def _store_ids(index_dir: Path) -> list[str]:
    with sqlite3.connect(index_dir / "store.sqlite") as conn:
        return [r[0] for r in conn.execute("SELECT id FROM docs")]


def _corpus(tmp_path: Path, n: int = 250, seed: int = 0) -> tuple[Path, list[dict]]:
    docs = generate_corpus(num_docs=n, seed=seed)
    path = tmp_path / "corpus.jsonl"
    write_corpus(path, docs)
    return path, docs


def _run(args: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout)


# --------------------------------------------------------------------------- bad lines
def test_bad_lines_reported_with_line_numbers_and_skipped(tmp_path) -> None:
    docs = generate_corpus(num_docs=40, seed=1)
    lines = [json.dumps(d) for d in docs[:10]]
    lines.insert(2, "{oops")  # line 3
    lines.insert(4, json.dumps({"contents": "no id"}))  # line 5
    lines.insert(6, json.dumps({"id": "z", "contents": 42}))  # line 7
    lines.insert(8, json.dumps(docs[0]))  # line 9: duplicate of line 1 (same batch)
    lines.append("")  # line 15: blank, ignored
    lines.append(json.dumps(docs[1]))  # line 16: duplicate of line 2 (earlier batch)
    lines.extend(json.dumps(d) for d in docs[10:20])  # lines 17..26
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")

    report = build_index(path, tmp_path / "ix", progress=False, batch_size=10)
    got = {b.line_no: b.reason for b in report.bad_lines}
    assert sorted(got) == [3, 5, 7, 9, 16]
    assert "invalid JSON" in got[3] and "missing field 'id'" in got[5] and "'contents' must be a string" in got[7]
    assert "duplicate id '0'" in got[9] and "duplicate id '1'" in got[16]
    assert report.bad_lines_total == report.bad_lines_run == 5
    assert report.num_docs == 20 == len(set(_store_ids(tmp_path / "ix")))
    assert report.lines_read == 26
    with open_retriever(tmp_path / "ix") as r:
        title = parse_contents(docs[15]["contents"])[0]
        assert r.search([title], top_k=1)[0][0].doc_id == docs[15]["id"]


def test_corpus_without_valid_docs_fails_clearly(tmp_path) -> None:
    path = tmp_path / "junk.jsonl"
    path.write_text("nope\n[1, 2]\n")
    with pytest.raises(IndexBuildError, match=r"no valid document in 2 lines"):
        build_index(path, tmp_path / "ix", progress=False)


# --------------------------------------------------------------------------- idempotence / append
def test_rebuild_adds_nothing_and_append_adds_only_new(tmp_path) -> None:
    path, docs = _corpus(tmp_path, n=120)
    first = build_index(path, tmp_path / "ix", progress=False, batch_size=50)
    assert (first.num_docs, first.added, first.rebuilt) == (120, 120, True)

    again = build_index(path, tmp_path / "ix", progress=False, batch_size=50)
    assert (again.num_docs, again.added, again.lines_read, again.rebuilt) == (120, 0, 0, False)

    extra = generate_corpus(num_docs=30, seed=99)
    with open(path, "a") as f:
        for d in extra:
            f.write(json.dumps({"id": "new-" + d["id"], "contents": d["contents"]}) + "\n")
    grown = build_index(path, tmp_path / "ix", progress=False, batch_size=50)
    assert (grown.num_docs, grown.added, grown.resumed_from_line, grown.rebuilt) == (150, 30, 120, True)
    ids = _store_ids(tmp_path / "ix")
    assert len(ids) == len(set(ids)) == 150
    assert read_manifest(tmp_path / "ix")["num_docs"] == 150
    with open_retriever(tmp_path / "ix") as r:
        assert r.num_docs == 150
        title = parse_contents(extra[3]["contents"])[0]
        assert r.search([title], top_k=1)[0][0].doc_id == "new-" + extra[3]["id"]


# --------------------------------------------------------------------------- resume
@pytest.mark.parametrize("phase", ["before_commit", "committed"])
def test_resume_after_injected_fault(tmp_path, phase: str) -> None:
    path, docs = _corpus(tmp_path, n=250)
    hook = FaultInjectingHook(batch_index=2, phase=phase)
    with pytest.raises(InjectedFault):
        build_index(path, tmp_path / "ix", progress=False, batch_size=40, on_batch=hook)
    committed = 3 if phase == "committed" else 2
    assert len(_store_ids(tmp_path / "ix")) == committed * 40
    assert not (tmp_path / "ix" / "manifest.json").exists()  # an unfinished index cannot be opened

    report = build_index(path, tmp_path / "ix", progress=False, batch_size=40)
    assert report.resumed_from_line == committed * 40
    assert report.added == 250 - committed * 40
    ids = _store_ids(tmp_path / "ix")
    assert sorted(ids) == sorted(d["id"] for d in docs)  # every doc once, none twice
    with open_retriever(tmp_path / "ix") as r:
        assert r.num_docs == 250


def test_resume_with_different_corpus_is_refused(tmp_path) -> None:
    path, _ = _corpus(tmp_path, n=100, seed=0)
    with pytest.raises(InjectedFault):
        build_index(path, tmp_path / "ix", progress=False, batch_size=30,
                    on_batch=FaultInjectingHook(batch_index=1, phase="committed"))
    write_corpus(path, generate_corpus(num_docs=100, seed=5))
    with pytest.raises(IndexBuildError, match="not the corpus"):
        build_index(path, tmp_path / "ix", progress=False, batch_size=30)


def test_other_backend_in_same_dir_is_refused(tmp_path) -> None:
    path, _ = _corpus(tmp_path, n=30)
    build_index(path, tmp_path / "ix", progress=False)
    with pytest.raises(IndexBuildError, match="holds a 'bm25' index"):
        build_index(path, tmp_path / "ix", backend="chroma", progress=False)


_KILLED_BUILD = textwrap.dedent("""
    import os, signal, sys
    from tepo_ray.tools.retrieval import build_index

    def kill_self(event):  # fault injection: hard kill (no cleanup) right after batch 3 commits
        if event.phase == "committed" and event.batch_index == 3:
            os.kill(os.getpid(), signal.SIGKILL)

    build_index(sys.argv[1], sys.argv[2], progress=False, batch_size=int(sys.argv[3]), on_batch=kill_self)
""")


def test_killed_build_resumes_and_persists_across_processes(tmp_path) -> None:
    """Build in a process that is SIGKILLed mid-way; finish with the CLI in a second; query in a third."""
    path, docs = _corpus(tmp_path, n=300)
    killed = _run([sys.executable, "-c", _KILLED_BUILD, str(path), str(tmp_path / "ix"), "50"], cwd=tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert len(_store_ids(tmp_path / "ix")) == 4 * 50

    resumed = _run([*CLI, "build", str(path), "--out", str(tmp_path / "ix"), "--batch-size", "50", "--no-progress"],
                   cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "300 docs (100 added this run, resumed after line 200)" in " ".join(resumed.stdout.split())
    assert sorted(_store_ids(tmp_path / "ix")) == sorted(d["id"] for d in docs)

    target = docs[123]
    query = _run([*CLI, "query", str(tmp_path / "ix"), parse_contents(target["contents"])[0], "--top-k", "2",
                  "--json"], cwd=tmp_path)
    assert query.returncode == 0, query.stderr
    hits = json.loads(query.stdout)
    assert len(hits) == 2 and hits[0]["doc_id"] == target["id"]

    text = _run([*CLI, "query", str(tmp_path / "ix"), parse_contents(target["contents"])[0], "--max-chars", "20"],
                cwd=tmp_path)
    assert text.stdout.startswith(f'Doc 1(Title: "{parse_contents(target["contents"])[0]}") ')


# --------------------------------------------------------------------------- CLI errors
def test_cli_missing_corpus_is_a_clear_error(tmp_path) -> None:
    res = _run([*CLI, "build", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "ix")], cwd=tmp_path)
    assert res.returncode == 2
    assert "corpus file not found" in res.stderr and "nope.jsonl" in res.stderr
    assert "Traceback" not in res.stderr + res.stdout


def test_cli_query_without_index_is_a_clear_error(tmp_path) -> None:
    res = _run([*CLI, "query", str(tmp_path), "anything"], cwd=tmp_path)
    assert res.returncode == 2
    assert "manifest.json" in res.stderr and "index build" in res.stderr
    assert "Traceback" not in res.stderr + res.stdout


def test_cli_unknown_backend(tmp_path) -> None:
    path, _ = _corpus(tmp_path, n=10)
    res = _run([*CLI, "build", str(path), "--out", str(tmp_path / "ix"), "--backend", "annoy"], cwd=tmp_path)
    assert res.returncode == 2 and "valid: ['bm25', 'chroma', 'faiss']" in res.stderr
