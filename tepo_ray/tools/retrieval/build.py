"""Streaming, resumable, idempotent index builds from a wiki-18 jsonl corpus.

`build_index` reads the corpus line by line from the last checkpoint, in batches of
``batch_size`` lines. Per batch:

1. bad lines (invalid UTF-8/JSON, missing or non-string ``id``/``contents``, an id seen before)
   are set aside with their 1-based line number; they never stop the build;
2. the backend writer gets the batch's valid docs (chroma: upsert with ids, idempotent);
3. one sqlite transaction commits the docs' ids (+ contents for bm25), the bad lines and the
   checkpoint (byte offset and line number after the batch).

A crash anywhere leaves whole batches in the store; re-running resumes after the last committed
batch, and a replayed batch cannot add a doc twice (ids are UNIQUE in the store, upserts are
idempotent). At the end the writer finalizes (bm25: builds the matrix from the store) and the
manifest is written, last. Re-running on an unchanged corpus adds nothing; on a corpus that grew
by appending, only the new lines are ingested. Resuming with a different corpus is refused.

A file lock in the index directory serialises concurrent builds of the same directory (e.g.
several search workers starting at once): the second waits, then finds nothing to do.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tepo_ray.data.corpus import corpus_fingerprint, iter_corpus_lines
from tepo_ray.tools.retrieval.base import (STORE_NAME, BackendName, IndexBuildError, get_backend,
                                           write_manifest)
from tepo_ray.tools.retrieval.store import DocStore

__all__ = ["BadLine", "BatchEvent", "BuildReport", "build_index", "DEFAULT_BATCH_SIZE"]

DEFAULT_BATCH_SIZE = 5_000
_HEAD_BYTES = 64 * 1024
_REPORTED_BAD_LINES = 100  # bad lines listed in a report (all are counted and kept in the store)


@dataclass(frozen=True)
class BadLine:
    """A corpus line that was skipped: 1-based line number and what was wrong/expected."""

    line_no: int
    reason: str


@dataclass(frozen=True)
class BatchEvent:
    """Passed to ``on_batch`` around each batch commit.

    ``phase``: "before_commit" (the writer has the batch, the store does not yet) or "committed".
    ``line_no``/``offset``: position just past the batch's last line.
    """

    phase: str
    batch_index: int
    line_no: int
    offset: int
    docs_in_batch: int


@dataclass
class BuildReport:
    """What a `build_index` call did. Counts marked *run* are for this call only."""

    out_dir: Path
    backend: str
    num_docs: int  # documents in the index now
    added: int  # run: documents added
    lines_read: int  # run: lines read (valid, bad or blank)
    resumed_from_line: int  # lines already ingested before this run (0 for a fresh build)
    bad_lines_total: int  # all bad lines of the corpus so far (this and earlier runs)
    bad_lines_run: int  # run: bad lines found
    bad_lines: list[BadLine] = field(default_factory=list)  # the first few, in line order
    rebuilt: bool = False  # whether the backend index was (re)built at the end
    seconds: float = 0.0
    corpus_fingerprint: str = ""

    def summary(self) -> str:
        resumed = f", resumed after line {self.resumed_from_line}" if self.resumed_from_line else ""
        return (f"{self.backend} index {self.out_dir}: {self.num_docs} docs ({self.added} added this run"
                f"{resumed}), {self.lines_read} lines read, {self.bad_lines_total} bad lines skipped, "
                f"{self.seconds:.1f} s")


def _head_sha(path: Path, n: int) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read(n)).hexdigest()


def _check_corpus_identity(store: DocStore, corpus: Path, size: int) -> None:
    """Refuse to resume a build from a different corpus (head bytes changed, or shorter than consumed)."""
    head_len = store.get_meta("head_len")
    if head_len is None:
        n = min(_HEAD_BYTES, size)
        store.set_meta({"head_len": n, "head_sha": _head_sha(corpus, n), "corpus_file": corpus.name})
        return
    offset, line_no = store.checkpoint()
    if size < offset or _head_sha(corpus, int(head_len)) != store.get_meta("head_sha"):
        raise IndexBuildError(
            f"{corpus} is not the corpus this index was being built from (its first bytes changed, or it is "
            f"shorter than the {offset} bytes / {line_no} lines already ingested from "
            f"{store.get_meta('corpus_file')!r}); build into a fresh --out directory")


def _make_progress(enabled: bool) -> Any:
    from rich.console import Console
    from rich.progress import (BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    # Tasks carry a `stats` field (free text); the ingest task's total is the corpus size in bytes.
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn(),
                    TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=Console(stderr=True), disable=not enabled, transient=False)


def build_index(corpus_path: str | os.PathLike, out_dir: str | os.PathLike, *,
                backend: str | BackendName = BackendName.BM25, batch_size: int = DEFAULT_BATCH_SIZE,
                progress: bool = True, embedding_model: str | os.PathLike | None = None,
                on_batch: Callable[[BatchEvent], None] | None = None,
                writer_options: dict[str, Any] | None = None) -> BuildReport:
    """Build (or resume, or top up) the index of ``corpus_path`` in ``out_dir``; see the module docstring.

    ``batch_size``: corpus lines per committed batch. ``embedding_model``: chroma only, a local
    sentence-transformers directory (default: the packaged all-MiniLM-L6-v2). ``on_batch``: called
    with a `BatchEvent` before and after each batch commit (progress hooks, fault injection in tests).
    ``writer_options``: backend-specific keyword arguments of its writer (bm25: ``shard_docs``,
    ``block_postings``; faiss: ``index_type``, ``batch_size``, ...); an unknown one fails naming it.
    Raises FileNotFoundError for a missing corpus, `IndexBuildError` when the corpus has no valid
    document or differs from the one a previous run started on.
    """
    t0 = time.perf_counter()
    corpus = Path(corpus_path)
    if not corpus.is_file():
        raise FileNotFoundError(f"corpus file not found: {corpus} (expected a wiki-18 jsonl file, one "
                                '{"id": ..., "contents": ...} object per line)')
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    spec = get_backend(backend)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    with open(out / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        store = DocStore(out / STORE_NAME)
        try:
            return _build_locked(corpus, out, store, spec=spec, batch_size=batch_size, progress=progress,
                                 embedding_model=embedding_model, on_batch=on_batch, t0=t0,
                                 writer_options=dict(writer_options or {}))
        finally:
            store.close()


def _build_locked(corpus: Path, out: Path, store: DocStore, *, spec: Any, batch_size: int, progress: bool,
                  embedding_model: str | os.PathLike | None, on_batch: Callable[[BatchEvent], None] | None,
                  t0: float, writer_options: dict[str, Any]) -> BuildReport:
    existing = store.get_meta("backend")
    if existing is None:
        store.set_meta({"backend": spec.name})
    elif existing != spec.name:
        raise IndexBuildError(f"{out} holds a {existing!r} index, not {spec.name!r}; use another --out directory")
    size = corpus.stat().st_size
    _check_corpus_identity(store, corpus, size)
    try:
        writer = spec.writer(out, embedding_model=None if embedding_model is None else str(embedding_model),
                             **writer_options)
    except TypeError as e:
        raise ValueError(f"backend {spec.name!r} does not take writer options {sorted(writer_options)}: {e}") from e
    # tokenizer / embedding model: must not change within one index (`resume_config`, else the manifest extra)
    config = json.dumps(getattr(writer, "resume_config", writer.manifest_extra)(), sort_keys=True)
    previous = store.get_meta("writer_config")
    if previous is None:
        store.set_meta({"writer_config": config})
    elif previous != config:
        raise IndexBuildError(f"{out} was started with {previous}, this build uses {config}; mixing them in one "
                              "index is wrong: pass the same --embedding-model, or build into a fresh --out directory")
    start_offset, start_line = store.checkpoint()

    added = lines = bad_run = batches = 0
    rebuilt = False
    with _make_progress(progress) as bar:
        task = bar.add_task(f"ingest {corpus.name}", total=size, completed=start_offset, stats="")
        docs: list[dict] = []
        bad: list[tuple[int, str]] = []
        seen: set[str] = set()
        n_in_batch = 0
        line_no, offset = start_line, start_offset

        def flush() -> None:
            nonlocal added, bad_run, batches, docs, bad, seen, n_in_batch
            if docs:
                dup = store.existing_ids([d["id"] for d in docs])
                if dup:
                    keep = []
                    for d in docs:
                        if d["id"] in dup:
                            bad.append((d.pop("_line"), f"duplicate id {d['id']!r} (already ingested)"))
                        else:
                            keep.append(d)
                    docs = keep
            for d in docs:
                d.pop("_line", None)
            if docs:
                writer.add(docs)
            event = BatchEvent("before_commit", batches, line_no, offset, len(docs))
            if on_batch is not None:
                on_batch(event)
            store.commit_batch(docs=docs, bad_lines=bad, offset=offset, line_no=line_no,
                               keep_contents=spec.stores_contents)
            added += len(docs)
            bad_run += len(bad)
            batches += 1
            if on_batch is not None:
                on_batch(BatchEvent("committed", event.batch_index, line_no, offset, len(docs)))
            bar.update(task, completed=offset, stats=f"{start_line + lines} lines, +{added} docs, {bad_run} bad")
            docs, bad, seen, n_in_batch = [], [], set(), 0

        for line in iter_corpus_lines(corpus, start_offset=start_offset, start_line=start_line):
            lines += 1
            n_in_batch += 1
            line_no, offset = line.line_no, line.end_offset
            if line.error is not None:
                bad.append((line.line_no, line.error))
            elif line.doc is not None:
                doc_id = line.doc["id"]
                if doc_id in seen:
                    bad.append((line.line_no, f"duplicate id {doc_id!r} (first seen earlier in this batch)"))
                else:
                    seen.add(doc_id)
                    docs.append({"id": doc_id, "contents": line.doc["contents"], "_line": line.line_no})
            if n_in_batch >= batch_size:
                flush()
        if n_in_batch:
            flush()

        num_docs = store.count()
        if num_docs == 0:
            raise IndexBuildError(f"{corpus}: no valid document in {start_line + lines} lines "
                                  f"({store.num_bad_lines()} bad; first: {store.bad_lines(limit=3)}); expected "
                                  'one {"id": str, "contents": str} JSON object per line')
        rebuilt = writer.finalize(store, progress=bar if progress else None)
    writer.close()

    fingerprint = corpus_fingerprint(corpus)
    bad_total = store.num_bad_lines()
    write_manifest(out, {"backend": spec.name, "num_docs": num_docs, "corpus_fingerprint": fingerprint,
                         "corpus_file": corpus.name, "lines": start_line + lines, "bad_lines": bad_total,
                         "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **writer.manifest_extra()})
    return BuildReport(out_dir=out, backend=spec.name, num_docs=num_docs, added=added, lines_read=lines,
                       resumed_from_line=start_line, bad_lines_total=bad_total, bad_lines_run=bad_run,
                       bad_lines=[BadLine(n, r) for n, r in store.bad_lines(limit=_REPORTED_BAD_LINES)],
                       rebuilt=rebuilt, seconds=time.perf_counter() - t0, corpus_fingerprint=fingerprint)
