"""Search tool backends over a wiki-18-format corpus (DESIGN.md section 4).

    build_index("corpus.jsonl", "runs/index")            # streaming, resumable; bm25 by default
    with open_retriever("runs/index") as r:
        hits = r.search(["founder of Zarkel Industries"], top_k=3)[0]
    observation = format_hits(hits, max_chars=300)       # the text the model sees

Backends are registered by name (`BackendName`: bm25, chroma, faiss); `register_backend` adds one.
"""

from tepo_ray.tools.retrieval.base import (NO_RESULTS, BackendName, Hit, IndexBuildError, IndexCorruptError,
                                           IndexNotFoundError,
                                           Retriever, format_hits, get_backend, open_retriever, read_manifest,
                                           register_backend)
from tepo_ray.tools.retrieval.build import BadLine, BatchEvent, BuildReport, build_index

__all__ = [
    "BackendName",
    "BadLine",
    "BatchEvent",
    "BuildReport",
    "BM25Retriever",
    "ChromaRetriever",
    "FaissRetriever",
    "Hit",
    "IndexBuildError",
    "IndexCorruptError",
    "IndexNotFoundError",
    "NO_RESULTS",
    "Retriever",
    "build_index",
    "format_hits",
    "get_backend",
    "open_retriever",
    "read_manifest",
    "register_backend",
]


def __getattr__(name: str):  # the backends import bm25s / chromadb: load them on first use
    if name == "BM25Retriever":
        from tepo_ray.tools.retrieval.bm25 import BM25Retriever

        return BM25Retriever
    if name == "ChromaRetriever":
        from tepo_ray.tools.retrieval.chroma import ChromaRetriever

        return ChromaRetriever
    if name == "FaissRetriever":
        from tepo_ray.tools.retrieval.dense_faiss import FaissRetriever

        return FaissRetriever
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
