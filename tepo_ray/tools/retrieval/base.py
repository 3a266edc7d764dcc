"""The retriever contract: `Hit`, `Retriever`, the backend registry, the index manifest, `format_hits`.

An index directory (built by `tepo_ray.tools.retrieval.build.build_index`) holds::

    manifest.json   written last, when a build finishes: backend, doc count, corpus fingerprint
    store.sqlite    every ingested doc id (+ contents for bm25), bad lines, the resume checkpoint
    bm25/ | chroma/ the backend's own files

`open_retriever(dir)` reads the manifest and returns the backend's `Retriever`.
"""

from __future__ import annotations

import abc
import enum
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

__all__ = [
    "BackendName",
    "Hit",
    "Retriever",
    "IndexNotFoundError",
    "IndexBuildError",
    "IndexCorruptError",
    "MANIFEST_NAME",
    "STORE_NAME",
    "read_manifest",
    "write_manifest",
    "register_backend",
    "get_backend",
    "open_retriever",
    "format_hits",
    "NO_RESULTS",
]

MANIFEST_NAME = "manifest.json"
STORE_NAME = "store.sqlite"
MANIFEST_FORMAT = 1
NO_RESULTS = "No results found."


class BackendName(str, enum.Enum):
    """Built-in retrieval backends (`register_backend` adds more)."""

    BM25 = "bm25"
    CHROMA = "chroma"
    FAISS = "faiss"


class IndexNotFoundError(FileNotFoundError):
    """The directory holds no finished index (no manifest); the message says how to build one."""


class IndexCorruptError(IndexNotFoundError):
    """An index file is there but unreadable or inconsistent (truncated, half-written, wrong shape)."""


class IndexBuildError(RuntimeError):
    """An index build cannot proceed (e.g. resuming with a different corpus); the message says why."""


@dataclass(frozen=True)
class Hit:
    """One retrieved document. ``score``: BM25 score, or cosine similarity for dense backends (higher is better)."""

    doc_id: str
    title: str
    text: str
    score: float


class Retriever(abc.ABC):
    """Batched top-k search over an index directory.

    Subclasses implement `_search` (non-blank queries only); `search` validates input and
    answers blank queries with no hits, so every backend behaves the same on them.
    Retrievers are thread-safe for concurrent `search` calls.
    """

    backend: ClassVar[str]

    @property
    @abc.abstractmethod
    def num_docs(self) -> int:
        """Number of documents in the index."""

    @abc.abstractmethod
    def _search(self, queries: list[str], *, top_k: int) -> list[list[Hit]]:
        """Top-``top_k`` hits per query, best first; ``queries`` are non-blank."""

    def search(self, queries: list[str], *, top_k: int) -> list[list[Hit]]:
        """Return, for each query, up to ``top_k`` hits sorted by decreasing score.

        ``queries``: list of B strings -> list of B lists. A query that matches nothing (or is blank)
        gets an empty list; fewer than ``top_k`` hits come back when fewer documents match.
        """
        if isinstance(queries, str) or not isinstance(queries, (list, tuple)):
            raise TypeError(f"queries must be a list of strings, got {type(queries).__name__}; "
                            "wrap a single query as [query]")
        for i, q in enumerate(queries):
            if not isinstance(q, str):
                raise TypeError(f"queries[{i}] must be a string, got {type(q).__name__}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be an int >= 1, got {top_k!r}")
        live = [i for i, q in enumerate(queries) if q.strip()]
        out: list[list[Hit]] = [[] for _ in queries]
        if live:
            for i, hits in zip(live, self._search([queries[i] for i in live], top_k=top_k)):
                out[i] = hits
        return out

    def close(self) -> None:
        """Release files and connections."""

    def __enter__(self) -> "Retriever":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class Backend:
    """How to write and read one kind of index.

    ``writer(out_dir, *, embedding_model)`` returns an object with ``add(docs)`` (idempotent per
    batch, called before the batch is committed to the store), ``finalize(store, *, progress)``
    (called once all lines are in the store) and ``manifest_extra() -> dict``.
    ``retriever(index_dir, *, manifest, embedding_model)`` returns a `Retriever`.
    ``stores_contents``: whether store.sqlite must keep each doc's contents (bm25 reads hits from it).
    """

    name: str
    writer: Callable[..., Any]
    retriever: Callable[..., Retriever]
    stores_contents: bool


_BACKENDS: dict[str, Backend] = {}


def register_backend(name: str, *, writer: Callable[..., Any], retriever: Callable[..., Retriever],
                     stores_contents: bool) -> None:
    """Register an index backend under ``name`` (used by `build_index` and `open_retriever`)."""
    _BACKENDS[str(name)] = Backend(str(name), writer, retriever, stores_contents)


def get_backend(name: str | BackendName) -> Backend:
    """The registered backend called ``name``; an unknown name fails listing the valid ones."""
    key = name.value if isinstance(name, BackendName) else str(name)
    if key not in _BACKENDS:
        _load_builtin_backends()
    if key not in _BACKENDS:
        raise ValueError(f"unknown retrieval backend {key!r}; valid: {sorted(_BACKENDS)}")
    return _BACKENDS[key]


def _load_builtin_backends() -> None:
    from tepo_ray.tools.retrieval import bm25, chroma, dense_faiss  # noqa: F401  (they register themselves)


# --------------------------------------------------------------------------- manifest
def read_manifest(index_dir: str | os.PathLike) -> dict:
    """The manifest of a finished index; `IndexNotFoundError` (with the fix) when there is none."""
    index_dir = Path(index_dir)
    path = index_dir / MANIFEST_NAME
    if not path.is_file():
        what = "does not exist" if not index_dir.exists() else f"has no {MANIFEST_NAME}"
        raise IndexNotFoundError(
            f"index directory {index_dir} {what}: it is not a built index, or its build did not finish. "
            f"Build it with `tepo-ray index build CORPUS.jsonl --out {index_dir}`.")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise IndexNotFoundError(f"{path}: invalid JSON ({e}); rebuild the index into a fresh directory") from e
    for key in ("format", "backend", "num_docs", "corpus_fingerprint"):
        if key not in manifest:
            raise IndexNotFoundError(f"{path}: missing field {key!r}; rebuild the index into a fresh directory")
    if manifest["format"] != MANIFEST_FORMAT:
        raise IndexNotFoundError(f"{path}: format {manifest['format']} is not supported (expected "
                                 f"{MANIFEST_FORMAT}); rebuild the index")
    return manifest


def write_manifest(index_dir: str | os.PathLike, manifest: dict) -> None:
    """Write the manifest atomically (temp file + rename)."""
    path = Path(index_dir) / MANIFEST_NAME
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"format": MANIFEST_FORMAT, **manifest}, indent=2, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


def open_retriever(index_dir: str | os.PathLike, *, backend: str | BackendName | None = None,
                   embedding_model: str | os.PathLike | None = None, **options: Any) -> Retriever:
    """Open the finished index in ``index_dir`` for searching.

    ``backend``: when given, must match the manifest (guards a config pointing at the wrong index).
    ``embedding_model``: dense backends only; a local sentence-transformers directory overriding the
    one recorded at build time. ``options``: the backend retriever's own keyword arguments (bm25:
    ``preload``, ``num_threads``; faiss: ``device``, ``nprobe``, ``ef_search``, ``use_gpu``, ``preload``).
    """
    manifest = read_manifest(index_dir)
    if backend is not None:
        want = backend.value if isinstance(backend, BackendName) else str(backend)
        if want != manifest["backend"]:
            raise ValueError(f"index {index_dir} was built with backend {manifest['backend']!r}, "
                             f"but backend {want!r} was requested (tools.search.backend); rebuild it with "
                             f"--backend {want} or point tools.search.index_dir at a {want} index")
    factory = get_backend(manifest["backend"]).retriever
    try:
        import inspect

        inspect.signature(factory).bind(Path(index_dir), manifest=manifest, embedding_model=embedding_model, **options)
    except TypeError as e:
        raise ValueError(f"backend {manifest['backend']!r} does not take the options {sorted(options)}: {e}") from None
    return factory(Path(index_dir), manifest=manifest, embedding_model=embedding_model, **options)


# --------------------------------------------------------------------------- observation text
def format_hits(hits: Sequence[Hit], *, max_chars: int) -> str:
    """The search tool's observation text, in Search-R1's format::

        Doc 1(Title: "Ashkeli") Ashkeli is a city in Dravenia. It was founded in ...
        Doc 2(Title: "...") ...

    Each doc's text (title excluded) is cut to at most ``max_chars`` characters; a cut text ends
    with "..." (included in the ``max_chars``). Newlines inside a text become spaces so every doc
    is one line. No hits -> ``NO_RESULTS``.
    """
    if isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < 4:
        raise ValueError(f"max_chars must be an int >= 4, got {max_chars!r}")
    if not hits:
        return NO_RESULTS
    lines = []
    for i, h in enumerate(hits, 1):
        text = " ".join(h.text.split())
        if len(text) > max_chars:
            text = text[: max_chars - 3].rstrip() + "..."
        lines.append(f'Doc {i}(Title: "{h.title}") {text}')
    return "\n".join(lines)
