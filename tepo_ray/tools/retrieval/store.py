"""`DocStore`: the sqlite file that makes index builds resumable and idempotent.

One transaction per batch writes the batch's docs, its bad lines and the checkpoint (byte offset
and line number just past the batch), so after a crash the store holds whole batches only and
the build resumes at the first line not committed. Doc ids are UNIQUE: a doc can never be
ingested twice.

Tables::

    docs(rowid INTEGER PRIMARY KEY, id TEXT UNIQUE NOT NULL, contents TEXT)  -- contents NULL if not kept
    bad_lines(line_no INTEGER PRIMARY KEY, reason TEXT NOT NULL)
    meta(key TEXT PRIMARY KEY, value TEXT NOT NULL)                         -- checkpoint, corpus identity
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Iterable, Iterator, Sequence

__all__ = ["DocStore"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS docs (rowid INTEGER PRIMARY KEY, id TEXT UNIQUE NOT NULL, contents TEXT);
CREATE TABLE IF NOT EXISTS bad_lines (line_no INTEGER PRIMARY KEY, reason TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
_SQL_VARS = 900  # stay under SQLITE_MAX_VARIABLE_NUMBER on old sqlite builds


class DocStore:
    """Doc ids (+ contents), bad lines and build checkpoint of one index directory.

    ``readonly`` opens for searching (several processes may read while one builds).
    """

    def __init__(self, path: str | Path, *, readonly: bool = False) -> None:
        self.path = Path(path)
        if readonly:
            if not self.path.is_file():
                raise FileNotFoundError(f"doc store {self.path} is missing; rebuild the index")
            self._conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
        else:
            self._conn = sqlite3.connect(self.path, check_same_thread=False)
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.executescript(_SCHEMA)
            self._conn.commit()
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ meta / checkpoint
    def get_meta(self, key: str, default: str | None = None) -> str | None:
        with self._lock:
            row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else row[0]

    def set_meta(self, items: dict[str, object]) -> None:
        with self._lock, self._conn:
            self._conn.executemany("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
                                   [(k, str(v)) for k, v in items.items()])

    def checkpoint(self) -> tuple[int, int]:
        """(byte offset, line number) just past the last committed line; (0, 0) for a new store."""
        return int(self.get_meta("offset", "0")), int(self.get_meta("line_no", "0"))

    # ------------------------------------------------------------------ ingestion
    def existing_ids(self, ids: Sequence[str]) -> set[str]:
        """The subset of ``ids`` already in the store."""
        found: set[str] = set()
        with self._lock:
            for s in range(0, len(ids), _SQL_VARS):
                chunk = ids[s:s + _SQL_VARS]
                q = f"SELECT id FROM docs WHERE id IN ({','.join('?' * len(chunk))})"
                found.update(r[0] for r in self._conn.execute(q, chunk))
        return found

    def commit_batch(self, *, docs: Sequence[dict], bad_lines: Sequence[tuple[int, str]], offset: int,
                     line_no: int, keep_contents: bool) -> None:
        """Atomically add ``docs`` (ids must be new) and ``bad_lines`` and move the checkpoint."""
        rows = [(d["id"], d["contents"] if keep_contents else None) for d in docs]
        with self._lock, self._conn:
            self._conn.executemany("INSERT INTO docs(id, contents) VALUES (?, ?)", rows)
            self._conn.executemany("INSERT OR REPLACE INTO bad_lines(line_no, reason) VALUES (?, ?)", bad_lines)
            self._conn.executemany("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
                                   [("offset", str(offset)), ("line_no", str(line_no))])

    # ------------------------------------------------------------------ reading
    def count(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM docs").fetchone()[0])

    def bad_lines(self, *, limit: int | None = None) -> list[tuple[int, str]]:
        """Bad lines recorded so far as (line number, reason), in line order."""
        q = "SELECT line_no, reason FROM bad_lines ORDER BY line_no"
        with self._lock:
            if limit is not None:
                return list(self._conn.execute(q + " LIMIT ?", (limit,)))
            return list(self._conn.execute(q))

    def num_bad_lines(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM bad_lines").fetchone()[0])

    def iter_docs(self, *, chunk: int = 10_000, after_rowid: int = 0) -> Iterator[tuple[int, str, str | None]]:
        """(rowid, id, contents) in rowid (= ingestion) order from ``after_rowid`` + 1, read in chunks."""
        last = after_rowid
        while True:
            with self._lock:
                rows = self._conn.execute("SELECT rowid, id, contents FROM docs WHERE rowid > ? ORDER BY rowid LIMIT ?",
                                          (last, chunk)).fetchall()
            if not rows:
                return
            yield from rows
            last = rows[-1][0]

    def get_by_rowids(self, rowids: Iterable[int]) -> dict[int, tuple[str, str | None]]:
        """rowid -> (id, contents) for the given rowids (missing ones are absent)."""
        rowids = list(dict.fromkeys(int(r) for r in rowids))
        out: dict[int, tuple[str, str | None]] = {}
        with self._lock:
            for s in range(0, len(rowids), _SQL_VARS):
                chunk = rowids[s:s + _SQL_VARS]
                q = f"SELECT rowid, id, contents FROM docs WHERE rowid IN ({','.join('?' * len(chunk))})"
                for rowid, doc_id, contents in self._conn.execute(q, chunk):
                    out[rowid] = (doc_id, contents)
        return out

    def close(self) -> None:
        with self._lock:
            self._conn.close()
