"""BM25 backend (default): a sharded, bounded-memory build and a small kernel that scores queries.

Index layout (``<index_dir>/bm25/``, written by `tepo_ray.tools.retrieval.bm25_build`): the CSC
score matrix (``data``/``indices``/``indptr`` .npy, bm25s's file names and dtypes), the sorted
64-bit hashes of the vocabulary (``vocab_hashes.npy``: term id = position), ``rowids.npy``
(matrix doc -> store.sqlite rowid), ``params.json`` and ``tokenizer.json``. All arrays are
loaded memory-mapped, so search workers on one machine share one copy of the index.

Resumable at two levels: the corpus is streamed into store.sqlite batch by batch (see
`build.build_index`), then `BM25Writer.finalize` builds shards of the store (a killed build keeps
its finished shards) and merges them, swapping the new directory in atomically.

Scoring (Lucene BM25, k1=1.5, b=0.75, precomputed per (term, doc) by bm25s): for a query with
tokens t_1..t_m, ``score(d) = Σ_j S[t_j, d]``; the top-k of the documents with score > 0 are
returned, ties broken by lower matrix index. Two exact implementations: a numba kernel (used
when numba imports; compiled once and cached on disk) and a numpy fallback, equal to the last bit.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from tepo_ray.data.corpus import parse_contents
from tepo_ray.tools.retrieval.base import (STORE_NAME, BackendName, Hit, IndexCorruptError, IndexNotFoundError,
                                           Retriever, register_backend)
from tepo_ray.tools.retrieval.bm25_build import (DEFAULT_BLOCK_POSTINGS, DEFAULT_SHARD_DOCS, build_sharded,
                                                 term_hashes)
from tepo_ray.tools.retrieval.store import DocStore

__all__ = ["BM25Retriever", "BM25Writer", "tokenize", "TOKENIZER_SPEC", "numba_available"]

BM25_DIR = "bm25"
TOKEN_PATTERN = r"(?u)\b\w\w+\b"
TOKENIZER_SPEC = {"pattern": TOKEN_PATTERN, "lower": True, "stopwords": "bm25s.stopwords.STOPWORDS_EN", "stemmer": None}
_TOKEN_RE = re.compile(TOKEN_PATTERN)


def _stopwords() -> frozenset[str]:
    from bm25s.stopwords import STOPWORDS_EN

    return frozenset(STOPWORDS_EN)


_STOP = _stopwords()


def tokenize(text: str) -> list[str]:
    """Lowercased words of >= 2 word characters, English stopwords removed (bm25s's default rules)."""
    return [t for t in _TOKEN_RE.findall(text.lower()) if t not in _STOP]


# --------------------------------------------------------------------------- scoring kernels
def _topk_python(q_ptr: np.ndarray, q_tok: np.ndarray, data: np.ndarray, indices: np.ndarray,
                 indptr: np.ndarray, num_docs: int, k: int, out_idx: np.ndarray, out_score: np.ndarray) -> None:
    """Top-k BM25 for B queries, written for numba (loops, no allocation per query).

    q_ptr [B+1], q_tok [sum of query lengths]: query b's token ids are q_tok[q_ptr[b]:q_ptr[b+1]].
    data/indices [nnz], indptr [V+1]: CSC score matrix (column t lists (doc, S[t, doc])).
    out_idx [B, k] (int64, pre-filled with -1), out_score [B, k] (float64): best first.
    Scores are summed in float64 in query-token order. The scores buffer is reset while the top-k
    is collected, so the cost per query is O(its postings), not O(docs).
    """
    scores = np.zeros(num_docs, dtype=np.float64)
    for qi in range(q_ptr.shape[0] - 1):
        a = q_ptr[qi]
        b = q_ptr[qi + 1]
        for j in range(a, b):
            t = q_tok[j]
            for p in range(indptr[t], indptr[t + 1]):
                scores[indices[p]] += np.float64(data[p])
        n = 0
        for j in range(a, b):
            t = q_tok[j]
            for p in range(indptr[t], indptr[t + 1]):
                d = indices[p]
                s = scores[d]
                if s <= 0.0:
                    continue
                scores[d] = 0.0  # reset, and mark d as collected
                if n == k and (s < out_score[qi, k - 1] or (s == out_score[qi, k - 1] and d > out_idx[qi, k - 1])):
                    continue
                pos = n if n < k else k - 1
                while pos > 0 and (out_score[qi, pos - 1] < s or (out_score[qi, pos - 1] == s and out_idx[qi, pos - 1] > d)):
                    out_score[qi, pos] = out_score[qi, pos - 1]
                    out_idx[qi, pos] = out_idx[qi, pos - 1]
                    pos -= 1
                out_score[qi, pos] = s
                out_idx[qi, pos] = d
                if n < k:
                    n += 1


_numba_kernel: Any = None
_numba_lock = threading.Lock()


def numba_available() -> bool:
    """Whether the numba scorer can be used (numba imports)."""
    try:
        import numba  # noqa: F401
    except Exception:  # ImportError, or numba refusing the installed numpy
        return False
    return True


def _get_numba_kernel() -> Any:
    global _numba_kernel
    with _numba_lock:
        if _numba_kernel is None:
            import numba

            _numba_kernel = numba.njit(cache=True, nogil=True)(_topk_python)
    return _numba_kernel


def _topk_numpy(q_ptr: np.ndarray, q_tok: np.ndarray, data: np.ndarray, indices: np.ndarray,
                indptr: np.ndarray, num_docs: int, k: int, out_idx: np.ndarray, out_score: np.ndarray) -> None:
    """Same contract and results as `_topk_python`, vectorised per query with numpy.

    ``np.bincount`` sums each doc's contributions in float64 in token order, like the kernel, so
    both give bit-identical scores.
    """
    for qi in range(q_ptr.shape[0] - 1):
        toks = q_tok[q_ptr[qi]:q_ptr[qi + 1]]
        if toks.size == 0:
            continue
        starts, ends = indptr[toks], indptr[toks + 1]
        docs = np.concatenate([indices[a:b] for a, b in zip(starts, ends)])  # [postings]
        if docs.size == 0:
            continue
        weights = np.concatenate([data[a:b] for a, b in zip(starts, ends)])  # [postings]
        scores = np.bincount(docs, weights=weights, minlength=num_docs)  # [num_docs] float64
        top = scores.max()
        if top <= 0.0:
            continue
        # Candidates: every doc scoring >= a threshold (so the top-k among them is the global top-k),
        # lowering the threshold until there are >= k; then cut at the k-th best score (a tie at the
        # cut keeps the lowest doc indices, like the kernel).
        for frac in (0.5, 0.2, 0.05, 0.0):
            cand = np.flatnonzero(scores > 0.0) if frac == 0.0 else np.flatnonzero(scores >= top * frac)
            if cand.size >= k:
                break
        if cand.size > k:
            vals = scores[cand]
            kth = np.partition(vals, vals.size - k)[vals.size - k]
            above = cand[vals > kth]
            cand = np.concatenate([above, cand[vals == kth][: k - above.size]])  # ties: lowest index first
        order = np.lexsort((cand, -scores[cand]))[:k]
        n = order.size
        out_idx[qi, :n] = cand[order]
        out_score[qi, :n] = scores[cand[order]]


# --------------------------------------------------------------------------- writer
class BM25Writer:
    """Builds ``<out_dir>/bm25`` from the docs in store.sqlite with the sharded, bounded-memory
    build of `tepo_ray.tools.retrieval.bm25_build` (shards kept in ``<out_dir>/bm25.shards`` until
    the new matrix is swapped in, so a killed build resumes at the first unfinished shard).

    ``shard_docs``: documents per shard (peak build memory grows with it: ~1 GB per 100k docs of
    ~100 words); ``block_postings``: postings held in memory per merge block.
    """

    on_shard: Any = None  # fault-injection hook (tests): called with the shard index after each shard is saved

    def __init__(self, out_dir: Path, *, embedding_model: str | None = None,
                 shard_docs: int = DEFAULT_SHARD_DOCS, block_postings: int = DEFAULT_BLOCK_POSTINGS) -> None:
        if embedding_model is not None:
            raise ValueError("--embedding-model applies to the dense backends (chroma, faiss) only, not bm25")
        for name, v in (("shard_docs", shard_docs), ("block_postings", block_postings)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"bm25 writer option {name} must be an int >= 1, got {v!r}")
        self.out_dir = Path(out_dir)
        self.shard_docs = shard_docs
        self.block_postings = block_postings
        self.last_build: dict | None = None

    def add(self, docs: Sequence[dict]) -> None:
        """Nothing to do per batch: the store is the intermediate; the matrix is built in `finalize`."""

    def finalize(self, store: DocStore, *, progress: Any = None) -> bool:
        """(Re)build the matrix when the store has docs the current matrix lacks. Returns whether it built."""
        n = store.count()
        final = self.out_dir / BM25_DIR
        if final.is_dir() and store.get_meta("bm25_indexed_count") == str(n):
            return False
        task = progress.add_task("bm25: shards + merge", total=1.0, stats=f"{n} docs") if progress is not None else None

        def report(phase: str, frac: float) -> None:
            if task is not None:
                progress.update(task, completed=frac, description=f"bm25: {phase}")

        def docs(after: int):
            return ((rowid, contents) for rowid, _id, contents in store.iter_docs(after_rowid=after))

        tmp = self.out_dir / (BM25_DIR + ".new")
        shutil.rmtree(tmp, ignore_errors=True)
        self.last_build = build_sharded(docs, num_docs=n, work_dir=self.out_dir / (BM25_DIR + ".shards"), out_dir=tmp,
                                        tokenize=tokenize, shard_docs=self.shard_docs,
                                        block_postings=self.block_postings, progress=report, on_shard=type(self).on_shard)
        (tmp / "tokenizer.json").write_text(json.dumps(TOKENIZER_SPEC, indent=2))
        old = self.out_dir / (BM25_DIR + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            os.replace(final, old)  # open retrievers keep their mapped (now unlinked) files
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        store.set_meta({"bm25_indexed_count": n})
        shutil.rmtree(self.out_dir / (BM25_DIR + ".shards"), ignore_errors=True)
        report("done", 1.0)
        return True

    def manifest_extra(self) -> dict:
        return {"tokenizer": TOKENIZER_SPEC, "bm25": {"method": "lucene", "k1": 1.5, "b": 0.75}}

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------- retriever
def _load_npy(path: Path, index_dir: Path) -> np.ndarray:
    if not path.is_file():
        raise IndexNotFoundError(f"{path} is missing: the bm25 index in {index_dir} is incomplete or was built by an "
                                 f"older version; rebuild with `tepo-ray index build CORPUS.jsonl --out {index_dir}`")
    try:
        return np.load(path, mmap_mode="r")
    except (ValueError, OSError, EOFError) as e:
        raise IndexCorruptError(f"{path} is corrupt ({e}); rebuild the index into a fresh directory") from e


class BM25Retriever(Retriever):
    """Searches a bm25 index directory. ``scorer``: "auto" (numba if it imports), "numba" or "numpy".

    Every array (matrix, vocabulary hashes, rowids) is a memory-mapped .npy: search workers on one
    machine share one copy of the index in the page cache, and a worker's own memory is the doc
    store connection, a [num_docs] float64 scores buffer and the scorer. ``preload`` touches every
    page at open (first queries are then as fast as later ones; the pages stay shared).

    ``num_threads`` > 1 splits a batch of queries over that many threads (the numba kernel runs
    without the GIL); keep 1 in a search worker that owns one CPU.

    The numba kernel is compiled (or loaded from its on-disk cache) here, not on the first query,
    so the first search call is as fast as the others.
    """

    backend = BackendName.BM25.value

    def __init__(self, index_dir: str | os.PathLike, *, manifest: dict | None = None,
                 embedding_model: str | os.PathLike | None = None, scorer: str = "auto",
                 num_threads: int = 1, preload: bool = False) -> None:
        self.index_dir = Path(index_dir)
        bm25_dir = self.index_dir / BM25_DIR
        if not (bm25_dir / "tokenizer.json").is_file():
            raise IndexNotFoundError(f"{bm25_dir} is missing or incomplete; rebuild with "
                                     f"`tepo-ray index build CORPUS.jsonl --out {self.index_dir}`")
        spec = json.loads((bm25_dir / "tokenizer.json").read_text())
        if spec != TOKENIZER_SPEC:
            raise IndexNotFoundError(f"{bm25_dir} was tokenized with {spec}, this code uses {TOKENIZER_SPEC}; "
                                     "rebuild the index into a fresh directory")
        self._data = _load_npy(bm25_dir / "data.csc.index.npy", self.index_dir)  # [nnz] float32
        self._indices = _load_npy(bm25_dir / "indices.csc.index.npy", self.index_dir)  # [nnz] int32
        self._indptr = _load_npy(bm25_dir / "indptr.csc.index.npy", self.index_dir)  # [V+1] int64
        self._vocab = _load_npy(bm25_dir / "vocab_hashes.npy", self.index_dir)  # [V] uint64 sorted
        self._rowids = _load_npy(bm25_dir / "rowids.npy", self.index_dir)  # [N] int64
        try:
            params = json.loads((bm25_dir / "params.json").read_text())
            self._num_docs = int(params["num_docs"])
        except (OSError, ValueError, KeyError) as e:
            raise IndexCorruptError(f"{bm25_dir / 'params.json'} is missing or corrupt ({e}); rebuild the index") from e
        nnz = int(self._indptr[-1]) if self._indptr.shape[0] else -1
        checks = [(self._data.shape == (nnz,), f"data.csc.index.npy has {self._data.shape} values, indptr ends at {nnz}"),
                  (self._indices.shape == (nnz,), f"indices.csc.index.npy has {self._indices.shape}, expected ({nnz},)"),
                  (self._indptr.shape == (self._vocab.shape[0] + 1,),
                   f"indptr has {self._indptr.shape[0]} entries for {self._vocab.shape[0]} terms"),
                  (self._rowids.shape == (self._num_docs,),
                   f"rowids.npy has {self._rowids.shape[0]} entries for {self._num_docs} documents")]
        for ok, what in checks:
            if not ok:
                raise IndexCorruptError(f"{bm25_dir}: {what}; the index is corrupt or half-written: rebuild it")
        if preload:
            for arr in (self._data, self._indices, self._indptr, self._vocab, self._rowids):
                if arr.size:
                    int(arr.reshape(-1).view(np.uint8)[::4096].sum())  # one read per page
        self._store = DocStore(self.index_dir / STORE_NAME, readonly=True)
        if scorer == "auto":
            scorer = "numba" if numba_available() else "numpy"
        if scorer not in ("numba", "numpy"):
            raise ValueError(f"scorer must be 'auto', 'numba' or 'numpy', got {scorer!r}")
        self.scorer = scorer
        if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
            raise ValueError(f"num_threads must be an int >= 1, got {num_threads!r}")
        self.num_threads = num_threads
        self._pool = ThreadPoolExecutor(num_threads, thread_name_prefix="bm25") if num_threads > 1 else None
        self._kernel = _get_numba_kernel() if scorer == "numba" else _topk_numpy
        self._topk([[0]] if self._indptr.shape[0] > 1 else [[]], 1)  # compile / warm up

    @property
    def num_docs(self) -> int:
        return self._num_docs

    def query_token_ids(self, query: str) -> list[int]:
        """Vocabulary ids of the query's tokens (unknown tokens dropped)."""
        return self._token_ids([query])[0]

    def _token_ids(self, queries: Sequence[str]) -> list[list[int]]:
        """Term ids per query: one vectorised lookup of all tokens' hashes in the sorted vocabulary."""
        toks = [tokenize(q) for q in queries]
        flat = [t for ts in toks for t in ts]
        if not flat or self._vocab.shape[0] == 0:
            return [[] for _ in queries]
        h = term_hashes(flat)  # [T]
        pos = np.searchsorted(self._vocab, h)  # [T]
        pos[pos == self._vocab.shape[0]] = 0
        ok = self._vocab[pos] == h
        out, i = [], 0
        for ts in toks:
            out.append([int(p) for p, good in zip(pos[i:i + len(ts)], ok[i:i + len(ts)]) if good])
            i += len(ts)
        return out

    def _topk(self, token_ids: Sequence[Sequence[int]], k: int) -> tuple[np.ndarray, np.ndarray]:
        """Matrix indices [B, k] (-1 = no hit) and scores [B, k] for B tokenized queries."""
        lens = np.fromiter((len(q) for q in token_ids), dtype=np.int64, count=len(token_ids))
        q_ptr = np.zeros(len(token_ids) + 1, dtype=np.int64)
        np.cumsum(lens, out=q_ptr[1:])
        q_tok = np.fromiter((t for q in token_ids for t in q), dtype=np.int64, count=int(q_ptr[-1]))
        out_idx = np.full((len(token_ids), k), -1, dtype=np.int64)
        out_score = np.zeros((len(token_ids), k), dtype=np.float64)
        args = (self._data, self._indices, self._indptr, self._num_docs, k)
        b = len(token_ids)
        if self._pool is None or b < 2 * self.num_threads:
            self._kernel(q_ptr, q_tok, *args, out_idx, out_score)
        else:  # row blocks: q_ptr[s:e+1] keeps absolute offsets into q_tok; outputs are row views
            bounds = np.linspace(0, b, self.num_threads + 1).astype(int)
            list(self._pool.map(lambda se: self._kernel(q_ptr[se[0]:se[1] + 1], q_tok, *args, out_idx[se[0]:se[1]],
                                                        out_score[se[0]:se[1]]), zip(bounds[:-1], bounds[1:])))
        return out_idx, out_score

    def _search(self, queries: list[str], *, top_k: int) -> list[list[Hit]]:
        k = min(top_k, self._num_docs)
        idx, score = self._topk(self._token_ids(queries), k)  # [B, k], [B, k]
        found = idx >= 0
        rowid_of = np.zeros_like(idx)
        rowid_of[found] = self._rowids[idx[found]]
        docs = self._store.get_by_rowids(rowid_of[found].tolist())
        out: list[list[Hit]] = []
        for b in range(len(queries)):
            hits = []
            for j in range(k):
                if idx[b, j] < 0:
                    break
                doc_id, contents = docs[int(rowid_of[b, j])]
                title, text = parse_contents(contents or "")
                hits.append(Hit(doc_id=doc_id, title=title, text=text, score=float(score[b, j])))
            out.append(hits)
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
        self._store.close()


register_backend(BackendName.BM25.value, writer=BM25Writer, retriever=BM25Retriever, stores_contents=True)
