"""Dense backend: a faiss index over sentence-transformers embeddings (what Search-R1 and ASearcher serve).

Build (``tepo-ray index build CORPUS --backend faiss [--index-type Flat|HNSW|IVF-PQ]``): the corpus
is streamed into store.sqlite like every backend; `FaissWriter.finalize` then embeds the stored
passages in batches (``"passage: "`` prefix for e5 models) and appends them to
``faiss/embeddings.f32`` with their store rowids in ``faiss/rowids.i64`` -- a killed build resumes
after the last whole batch -- and finally trains/fills the index and writes ``faiss/index.faiss``.

Prebuilt (`import_prebuilt`, ``tepo-ray index import-faiss``): an index made elsewhere in the
Search-R1 layout (``e5_Flat.index`` or an HNSW/IVF index, plus ``wiki-18.jsonl`` with the same
passages in the same order) is used as it is: one pass over the jsonl records each line's byte
offset (``faiss/line_offsets.npy``), nothing is re-embedded.

Serving: the index is read with ``IO_FLAG_MMAP_IFC`` (memory-mapped, read-only) so search workers
on one machine share the vectors in the page cache; each worker holds only its query encoder.
Index types and their memory for 21M passages x 768 dims (e5-base-v2): Flat 64.6 GB (exact),
HNSW32 ~70 GB (vectors + graph), IVF-PQ (``IVF65536,PQ96``) ~2.2 GB of codes + ids -- see
docs/search.md. Scores are inner products of normalised vectors (= cosine similarity).
"""

from __future__ import annotations

import enum
import json
import os
import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from tepo_ray.data.corpus import corpus_fingerprint, parse_contents
from tepo_ray.tools.retrieval.base import (MANIFEST_NAME, STORE_NAME, BackendName, Hit, IndexBuildError,
                                           IndexCorruptError, IndexNotFoundError, Retriever, register_backend,
                                           write_manifest)
from tepo_ray.tools.retrieval.store import DocStore

__all__ = ["FaissIndexType", "FaissWriter", "FaissRetriever", "DenseEncoder", "import_prebuilt",
           "DimensionMismatchError", "index_memory_bytes"]

FAISS_DIR = "faiss"
INDEX_FILE = "index.faiss"


class FaissIndexType(str, enum.Enum):
    """Index types (a build-time choice). Flat: exact; HNSW: graph, fast, ~vectors + 8*M*2 bytes/vector;
    IVF-PQ: compressed codes, smallest, approximate (needs training: >= 39 x nlist passages)."""

    FLAT = "Flat"
    HNSW = "HNSW"
    IVF_PQ = "IVF-PQ"


class DimensionMismatchError(IndexNotFoundError):
    """The query encoder's vectors do not have the index's dimension (index built with another model)."""


def index_memory_bytes(index_type: str, *, num_docs: int, dim: int, hnsw_m: int = 32, pq_m: int = 96,
                       nlist: int = 65536) -> int:
    """Resident bytes of the index (vectors/codes + structure), for sizing (docs/search.md)."""
    t = FaissIndexType(index_type)
    if t is FaissIndexType.FLAT:
        return num_docs * dim * 4
    if t is FaissIndexType.HNSW:
        return num_docs * (dim * 4 + hnsw_m * 2 * 4 + 8)  # vectors + level-0 links (2M ints) + levels
    return num_docs * (pq_m + 8) + nlist * dim * 4  # codes + ids + coarse centroids


def _model_dir_and_name(embedding_model: str | os.PathLike | None) -> tuple[Path, str]:
    from tepo_ray.tools.retrieval.chroma import resolve_embedding_model

    return resolve_embedding_model(embedding_model)


def _default_prefixes(model_name: str) -> tuple[str, str]:
    """e5 models are trained with "query: " / "passage: " prefixes; others with none."""
    return ("query: ", "passage: ") if "e5" in Path(model_name).name.lower() else ("", "")


class DenseEncoder:
    """A local sentence-transformers model (never downloaded) giving L2-normalised float32 vectors.

    ``device``: "cpu", "cuda", "cuda:1" ... The query and passage prefixes default by model name.
    """

    def __init__(self, embedding_model: str | os.PathLike | None = None, *, device: str = "cpu",
                 query_prefix: str | None = None, passage_prefix: str | None = None) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        model_dir, self.model_name = _model_dir_and_name(embedding_model)
        qp, pp = _default_prefixes(self.model_name)
        self.query_prefix = qp if query_prefix is None else query_prefix
        self.passage_prefix = pp if passage_prefix is None else passage_prefix
        self._model = SentenceTransformer(str(model_dir), device=device)
        get_dim = getattr(self._model, "get_embedding_dimension", None) or self._model.get_sentence_embedding_dimension
        self.dim = int(get_dim())
        self._lock = threading.Lock()  # torch modules are not re-entrant across threads

    def encode(self, texts: Sequence[str], *, kind: str, batch_size: int = 64) -> np.ndarray:
        """[len(texts), dim] float32, unit norm. ``kind``: "query" or "passage" (picks the prefix)."""
        prefix = self.query_prefix if kind == "query" else self.passage_prefix
        with self._lock:
            v = self._model.encode([prefix + t for t in texts], batch_size=batch_size, convert_to_numpy=True,
                                   normalize_embeddings=True, show_progress_bar=False)
        return np.ascontiguousarray(v, dtype=np.float32)


# --------------------------------------------------------------------------- writer
class FaissWriter:
    """Embeds the store's passages (resumable) and builds ``faiss/index.faiss`` (see module docstring).

    ``index_type``: Flat | HNSW | IVF-PQ. ``encode_batch``: passages per encoder call and per
    checkpoint. ``hnsw_m``/``ef_construction``; ``nlist`` (IVF lists; default ~4*sqrt(N), capped so
    each list has >= 39 training points) and ``pq_m`` (PQ sub-quantizers; must divide dim),
    ``pq_nbits``. ``device``: where the encoder runs.
    """

    on_chunk: Any = None  # fault-injection hook (tests): called with the passages embedded so far, per chunk

    def __init__(self, out_dir: Path, *, embedding_model: str | None = None, index_type: str = "Flat",
                 encode_batch: int = 256, device: str = "cpu", hnsw_m: int = 32, ef_construction: int = 200,
                 nlist: int | None = None, pq_m: int | None = None, pq_nbits: int = 8) -> None:
        try:
            self.index_type = FaissIndexType(index_type)
        except ValueError:
            raise ValueError(f"faiss index_type must be one of {[t.value for t in FaissIndexType]}, "
                             f"got {index_type!r}") from None
        self.out_dir = Path(out_dir)
        self._embedding_model = embedding_model
        _, self.model_name = _model_dir_and_name(embedding_model)
        self.query_prefix, self.passage_prefix = _default_prefixes(self.model_name)
        self.encode_batch, self.device = int(encode_batch), device
        self.hnsw_m, self.ef_construction = int(hnsw_m), int(ef_construction)
        self.nlist, self.pq_m, self.pq_nbits = nlist, pq_m, int(pq_nbits)

    def add(self, docs: Sequence[dict]) -> None:
        """Nothing per ingest batch: passages are embedded from the store in `finalize` (own checkpoint)."""

    def _embed(self, store: DocStore, progress: Any) -> tuple[Path, Path, int, int]:
        d = self.out_dir / FAISS_DIR
        d.mkdir(parents=True, exist_ok=True)
        emb_path, rid_path = d / "embeddings.f32", d / "rowids.i64"
        meta = d / "embeddings.json"
        known = json.loads(meta.read_text()) if meta.is_file() else None
        if known is not None and known.get("model") != self.model_name:
            emb_path.unlink(missing_ok=True)
            rid_path.unlink(missing_ok=True)
            known = None
        total = store.count()
        encoder = None
        if known is None:
            encoder = DenseEncoder(self._embedding_model, device=self.device, query_prefix=self.query_prefix,
                                   passage_prefix=self.passage_prefix)
            known = {"model": self.model_name, "dim": encoder.dim}
            meta.write_text(json.dumps(known))
        dim = int(known["dim"])
        for p in (emb_path, rid_path):
            if not p.exists():
                p.touch()
        # A kill between the two appends leaves one file a chunk ahead: keep whole rows present in both.
        rows = min(emb_path.stat().st_size // (4 * dim), rid_path.stat().st_size // 8)
        for p, size in ((emb_path, rows * 4 * dim), (rid_path, rows * 8)):
            if p.stat().st_size != size:
                os.truncate(p, size)
        if rows == total:  # everything embedded already (e.g. only the index type changed)
            return emb_path, rid_path, rows, dim
        if encoder is None:
            encoder = DenseEncoder(self._embedding_model, device=self.device, query_prefix=self.query_prefix,
                                   passage_prefix=self.passage_prefix)
        last = int(np.fromfile(rid_path, dtype=np.int64, offset=(rows - 1) * 8, count=1)[0]) if rows else 0
        task = progress.add_task("faiss: embed", total=total, completed=rows, stats=encoder.model_name) \
            if progress is not None else None
        batch: list[tuple[int, str]] = []

        def flush() -> None:
            nonlocal rows
            vecs = encoder.encode([c for _, c in batch], kind="passage", batch_size=min(64, len(batch)))
            with open(emb_path, "ab") as f:
                vecs.tofile(f)
            with open(rid_path, "ab") as f:
                np.asarray([r for r, _ in batch], dtype=np.int64).tofile(f)
            rows += len(batch)
            batch.clear()
            if task is not None:
                progress.update(task, completed=rows)
            if type(self).on_chunk is not None:
                type(self).on_chunk(rows)

        for rowid, _doc_id, contents in store.iter_docs(after_rowid=last):
            title, text = parse_contents(contents or "")
            batch.append((rowid, f"{title}\n{text}" if title else text))
            if len(batch) >= self.encode_batch:
                flush()
        if batch:
            flush()
        if rows != total:
            raise IndexBuildError(f"{emb_path}: {rows} embedded passages but the store holds {total}; "
                                  "delete the faiss/ directory and rebuild")
        return emb_path, rid_path, rows, dim

    def _make_index(self, dim: int, n: int) -> Any:
        import faiss

        if self.index_type is FaissIndexType.FLAT:
            return faiss.IndexFlatIP(dim)
        if self.index_type is FaissIndexType.HNSW:
            index = faiss.IndexHNSWFlat(dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = self.ef_construction
            return index
        nlist = self.nlist or max(1, min(int(4 * np.sqrt(n)), n // 39))
        pq_m = self.pq_m or next(m for m in (96, 64, 48, 32, 24, 16, 12, 8, 6, 4, 3, 2, 1) if dim % m == 0)
        if dim % pq_m:
            raise ValueError(f"faiss pq_m={pq_m} must divide the embedding dimension {dim}")
        if n < 2 ** self.pq_nbits:
            raise IndexBuildError(f"IVF-PQ with pq_nbits={self.pq_nbits} needs >= {2 ** self.pq_nbits} passages to "
                                  f"train, the corpus has {n}; use --index-type Flat or HNSW")
        return faiss.index_factory(dim, f"IVF{nlist},PQ{pq_m}x{self.pq_nbits}", faiss.METRIC_INNER_PRODUCT)

    def finalize(self, store: DocStore, *, progress: Any = None) -> bool:
        import faiss

        n = store.count()
        final = self.out_dir / FAISS_DIR / INDEX_FILE
        if final.is_file() and store.get_meta("faiss_indexed") == f"{n}:{self.index_type.value}":
            return False
        emb_path, rid_path, rows, dim = self._embed(store, progress)
        vecs = np.memmap(emb_path, dtype=np.float32, mode="r", shape=(rows, dim))
        index = self._make_index(dim, rows)
        if not index.is_trained:
            rng = np.random.default_rng(0)
            sample = np.sort(rng.choice(rows, size=min(rows, 256 * max(1, getattr(index, "nlist", 1)), 500_000),
                                        replace=False))
            index.train(np.ascontiguousarray(vecs[sample]))
        for s in range(0, rows, 65_536):
            index.add(np.ascontiguousarray(vecs[s:s + 65_536]))
        del vecs
        tmp = final.with_name(INDEX_FILE + ".tmp")
        faiss.write_index(index, str(tmp))
        np.save(final.with_name("rowids.npy"), np.fromfile(rid_path, dtype=np.int64))
        (final.parent / "params.json").write_text(json.dumps({"dim": dim, "num_docs": rows,
                                                              "index_type": self.index_type.value}))
        os.replace(tmp, final)  # open retrievers keep their mapped (now unlinked) file
        store.set_meta({"faiss_indexed": f"{n}:{self.index_type.value}"})
        return True

    def resume_config(self) -> dict:
        """What must not change within one index directory (the index type may: embeddings are reused)."""
        return {"embedding_model": self.model_name, "query_prefix": self.query_prefix,
                "passage_prefix": self.passage_prefix}

    def manifest_extra(self) -> dict:
        return {**self.resume_config(), "index_type": self.index_type.value, "metric": "inner_product"}

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------- doc sources
class _JsonlDocs:
    """Passage i of a jsonl corpus via its recorded byte offset (line_offsets.npy, memory-mapped)."""

    def __init__(self, corpus: Path, offsets: np.ndarray) -> None:
        self._path, self._offsets = corpus, offsets
        self._local = threading.local()

    def get(self, positions: Sequence[int]) -> dict[int, tuple[str, str]]:
        f = getattr(self._local, "f", None)
        if f is None:
            f = self._local.f = open(self._path, "rb")
        out = {}
        for p in positions:
            f.seek(int(self._offsets[p]))
            line = f.readline()
            try:
                obj = json.loads(line)
                out[p] = (str(obj.get("id", p)), str(obj["contents"]))
            except (ValueError, KeyError, TypeError) as e:
                raise IndexCorruptError(f"{self._path}: line {p + 1} is not a wiki-18 record ({e}); the corpus changed "
                                        "after `index import-faiss`: import it again") from e
        return out

    def close(self) -> None:
        f = getattr(self._local, "f", None)
        if f is not None:
            f.close()


# --------------------------------------------------------------------------- retriever
def _read_index(path: Path) -> Any:
    import faiss

    if not path.is_file():
        raise IndexNotFoundError(f"faiss index file {path} is missing; rebuild with `tepo-ray index build CORPUS "
                                 "--backend faiss --out DIR` or import one with `tepo-ray index import-faiss`")
    try:
        return faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY)
    except RuntimeError as e:
        msg = " ".join(str(e).split())[:300]
        raise IndexCorruptError(f"{path} is not a readable faiss index ({msg}); rebuild or re-download it") from e


class FaissRetriever(Retriever):
    """Dense search over a faiss index directory (built here, or an imported Search-R1 index).

    ``embedding_model`` overrides the manifest's encoder; ``device`` runs the query encoder on "cpu"
    or a GPU; ``nprobe`` (IVF) and ``ef_search`` (HNSW) trade recall for speed; ``use_gpu`` copies
    the index to all GPUs when faiss-gpu is installed (the copy is per process: no sharing).
    """

    backend = BackendName.FAISS.value

    def __init__(self, index_dir: str | os.PathLike, *, manifest: dict | None = None,
                 embedding_model: str | os.PathLike | None = None, device: str = "cpu", nprobe: int = 32,
                 ef_search: int = 128, use_gpu: bool = False, preload: bool = False) -> None:
        import faiss

        self.index_dir = Path(index_dir)
        manifest = manifest or {}
        prebuilt = manifest.get("prebuilt")
        if prebuilt:
            index_path = self._resolve(prebuilt["index_file"])
            corpus = self._resolve(prebuilt["corpus_file"])
            offsets = np.load(self.index_dir / FAISS_DIR / "line_offsets.npy", mmap_mode="r")
            self._docs: Any = _JsonlDocs(corpus, offsets)
            self._rowids = None
            n_docs = offsets.shape[0]
        else:
            index_path = self.index_dir / FAISS_DIR / INDEX_FILE
            rid = self.index_dir / FAISS_DIR / "rowids.npy"
            if not rid.is_file():
                raise IndexNotFoundError(f"{rid} is missing; the faiss build in {self.index_dir} did not finish: "
                                         "run `tepo-ray index build` again to resume it")
            self._rowids = np.load(rid, mmap_mode="r")
            self._docs = DocStore(self.index_dir / STORE_NAME, readonly=True)
            n_docs = self._rowids.shape[0]
        self._index = _read_index(index_path)
        if self._index.ntotal != n_docs:
            raise IndexCorruptError(f"{index_path} holds {self._index.ntotal} vectors but the corpus/doc list has "
                                    f"{n_docs} passages; they must be the same passages in the same order")
        if embedding_model is None:
            embedding_model = manifest.get("embedding_model")
        self._encoder = DenseEncoder(embedding_model, device=device, query_prefix=manifest.get("query_prefix"),
                                     passage_prefix=manifest.get("passage_prefix"))
        if self._encoder.dim != self._index.d:
            raise DimensionMismatchError(
                f"the query encoder {self._encoder.model_name!r} gives {self._encoder.dim}-dim vectors but "
                f"{index_path} holds {self._index.d}-dim ones: the index was built with another model; set "
                "tools.search.embedding_model to that model (e.g. e5-base-v2 for Search-R1's e5_Flat.index)")
        if hasattr(self._index, "nprobe"):
            self._index.nprobe = int(nprobe)
        hnsw = getattr(self._index, "hnsw", None)
        if hnsw is not None:
            hnsw.efSearch = int(ef_search)
        if use_gpu:
            if not hasattr(faiss, "StandardGpuResources"):
                raise ModuleNotFoundError("use_gpu needs faiss-gpu (pip install faiss-gpu-cu12); this faiss is CPU-only")
            self._index = faiss.index_cpu_to_all_gpus(self._index)
        self._num_docs = int(n_docs)
        if preload:
            self._index.search(np.zeros((1, self._index.d), dtype=np.float32), 1)

    def _resolve(self, p: str) -> Path:
        path = Path(p)
        return path if path.is_absolute() else self.index_dir / path

    @property
    def num_docs(self) -> int:
        return self._num_docs

    @property
    def dim(self) -> int:
        return int(self._index.d)

    def _search(self, queries: list[str], *, top_k: int) -> list[list[Hit]]:
        k = min(top_k, self._num_docs)
        q = self._encoder.encode(queries, kind="query")  # [B, dim]
        scores, idx = self._index.search(q, k)  # [B, k], [B, k]; -1 = no hit
        found = idx[idx >= 0]
        if self._rowids is not None:
            keys = {int(i): int(self._rowids[i]) for i in found}
            rows = self._docs.get_by_rowids(keys.values())
            docs = {i: rows[r] for i, r in keys.items()}
        else:
            docs = self._docs.get(sorted({int(i) for i in found}))
        out = []
        for b in range(len(queries)):
            hits = []
            for j in range(k):
                i = int(idx[b, j])
                if i < 0:
                    break
                doc_id, contents = docs[i]
                title, text = parse_contents(contents or "")
                hits.append(Hit(doc_id=doc_id, title=title, text=text, score=float(scores[b, j])))
            out.append(hits)
        return out

    def close(self) -> None:
        self._docs.close()


# --------------------------------------------------------------------------- prebuilt import
def import_prebuilt(index_file: str | os.PathLike, corpus_file: str | os.PathLike, out_dir: str | os.PathLike, *,
                    embedding_model: str | os.PathLike | None = None, query_prefix: str | None = None,
                    progress: bool = False) -> dict:
    """Make ``out_dir`` an index over a prebuilt faiss file + its jsonl corpus (Search-R1 layout).

    Reads the corpus once to record line offsets (checking each line is a wiki-18 record and the
    count equals the index's vectors); writes ``out_dir/faiss/line_offsets.npy`` and the manifest.
    The index file is not copied or rewritten. Returns the manifest.
    """
    index_file, corpus_file, out = Path(index_file).resolve(), Path(corpus_file).resolve(), Path(out_dir)
    if not corpus_file.is_file():
        raise FileNotFoundError(f"corpus file not found: {corpus_file} (expected wiki-18.jsonl)")
    index = _read_index(index_file)
    offsets = np.empty(max(int(index.ntotal), 1), dtype=np.int64)
    n, pos = 0, 0
    with open(corpus_file, "rb") as f:
        for line in f:
            if line.strip():
                if n >= index.ntotal:
                    n += 1
                    break
                if n < 3:  # check the format on the first lines (a full parse of 13 GB would take minutes)
                    try:
                        obj = json.loads(line)
                        assert isinstance(obj["contents"], str)
                    except Exception as e:  # noqa: BLE001
                        raise ValueError(f"{corpus_file}: line {n + 1} is not a wiki-18 record "
                                         f'{{"id", "contents"}} ({e!r})') from None
                offsets[n] = pos
                n += 1
            pos += len(line)
    if n != index.ntotal:
        raise IndexBuildError(f"{index_file} holds {index.ntotal} vectors but {corpus_file} has "
                              f"{f'more than {index.ntotal}' if n > index.ntotal else n} passages; they must match line by line")
    d = out / FAISS_DIR
    d.mkdir(parents=True, exist_ok=True)
    np.save(d / "line_offsets.npy", offsets[:n])
    _, model_name = _model_dir_and_name(embedding_model)
    qp, pp = _default_prefixes(model_name)
    manifest = {"backend": "faiss", "num_docs": n, "corpus_fingerprint": corpus_fingerprint(corpus_file),
                "corpus_file": corpus_file.name, "embedding_model": str(embedding_model or model_name),
                "index_type": type(index).__name__, "metric": "inner_product",
                "query_prefix": qp if query_prefix is None else query_prefix, "passage_prefix": pp,
                "prebuilt": {"index_file": str(index_file), "corpus_file": str(corpus_file)}}
    write_manifest(out, manifest)
    return json.loads((out / MANIFEST_NAME).read_text())


register_backend(BackendName.FAISS.value, writer=FaissWriter, retriever=FaissRetriever, stores_contents=True)
