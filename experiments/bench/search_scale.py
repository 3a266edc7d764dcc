"""BM25 at scale: build time, peak build RSS, index size, load time, q/s and recall, extrapolated to wiki-18.

    python -m experiments.bench.search_scale --docs 250000,1000000 --workdir runs/bench_scale

For each size N: a wiki-18-format corpus of N passages of ~``--words`` words (the synthetic
world's entity sentence -- the planted fact a question asks about -- plus Zipf-distributed filler
words from an open vocabulary, so the vocabulary keeps growing with N like real text), built with
the real CLI path (`build_index`, sharded bm25) in a *subprocess* whose peak RSS
(``ru_maxrss``) is the build's own. Then, in this process: open time of the retriever, batched and
one-by-one queries/s (1 thread = one search worker; also per CPU-second, i.e. for a worker that
owns a core on a busy machine) and recall@k of the planted document.

Baseline in the same run: bm25s's one-shot build (what the index used before) over the first
``--baseline-docs`` passages, also in a subprocess, for peak RSS per passage.

The extrapolation to 21,015,324 passages fits ``peak RSS = a + b * N`` and ``seconds = c * N``
through the measured sizes; the index size scales per passage.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

WIKI18_PASSAGES = 21_015_324


def _filler_words(rng: np.random.Generator, n: int) -> list[str]:
    """n words with Zipf(1.3) ranks over an unbounded vocabulary (rank r -> a fixed letter string)."""
    ranks = rng.zipf(1.3, size=n)
    out = []
    for r in ranks.tolist():
        s = []
        r = int(r)
        while r:
            r, c = divmod(r, 23)
            s.append("abcdefghijklmnoprstuvwz"[c])
        out.append("q" + "".join(s))
    return out


def write_corpus(path: Path, *, docs: int, words: int, seed: int) -> tuple[object, float]:
    from tepo_ray.data.corpus import generate_world

    world = generate_world(num_docs=docs, seed=seed)
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    with open(path, "w", encoding="utf-8") as f:
        for d in world.docs:
            title, _, text = d["contents"].partition("\n")
            pad = max(0, words - len(text.split()))
            text = text + " " + " ".join(_filler_words(rng, pad))
            f.write(json.dumps({"id": d["id"], "contents": f"{title}\n{text}"}) + "\n")
    return world, time.perf_counter() - t0


_BUILD = r"""
import json, resource, sys, time
from tepo_ray.tools.retrieval import build_index
t0 = time.perf_counter(); last = [t0]
def on_batch(e):
    last[0] = time.perf_counter()
r = build_index(sys.argv[1], sys.argv[2], progress=False, batch_size=10_000, on_batch=on_batch)
t1 = time.perf_counter()
print(json.dumps({"docs": r.num_docs, "build_s": t1 - t0, "ingest_s": last[0] - t0, "bm25_s": t1 - last[0],
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

_BASELINE = r"""
import json, resource, sys, time, itertools
import bm25s
from tepo_ray.data.corpus import iter_corpus
from tepo_ray.tools.retrieval.bm25 import tokenize
t0 = time.perf_counter()
vocab = {}
ids = [[vocab.setdefault(t, len(vocab)) for t in tokenize(d["contents"])]
       for d in itertools.islice(iter_corpus(sys.argv[1]), int(sys.argv[2]))]
m = bm25s.BM25(); m.index((ids, vocab), create_empty_token=False, show_progress=False)
print(json.dumps({"docs": len(ids), "build_s": time.perf_counter() - t0,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _sub(code: str, *args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path.cwd()), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-3000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run_size(work: Path, *, docs: int, words: int, seed: int, queries: int, batch: int, top_k: int) -> dict:
    from tepo_ray.data.corpus import generate_single_hop_questions
    from tepo_ray.tools.retrieval.bm25 import BM25Retriever

    work.mkdir(parents=True, exist_ok=True)
    corpus = work / f"corpus_{docs}.jsonl"
    index = work / f"index_{docs}"
    world, write_s = write_corpus(corpus, docs=docs, words=words, seed=seed)
    res: dict = {"docs": docs, "corpus_mb": corpus.stat().st_size / 2**20, "write_s": write_s}
    with open(corpus) as f:
        sample = [json.loads(next(f))["contents"] for _ in range(1000)]
    res["words_per_passage"] = float(np.mean([len(s.split()) for s in sample]))
    res.update(_sub(_BUILD, str(corpus), str(index)))
    res["index_mb"] = _dir_bytes(index / "bm25") / 2**20
    res["store_mb"] = (index / "store.sqlite").stat().st_size / 2**20
    params = json.loads((index / "bm25" / "params.json").read_text())
    res["vocab"] = params["vocab_size"]
    res["nnz"] = params["nnz"]

    qs = generate_single_hop_questions(world, n=queries, seed=1)
    texts = [q["question"] for q in qs]
    t0 = time.perf_counter()
    r = BM25Retriever(index)
    res["open_s"] = time.perf_counter() - t0
    r.search(texts[:50], top_k=top_k)
    best = {"batched": float("inf"), "one_by_one": float("inf"), "batched_cpu": float("inf")}
    for _ in range(2):
        t0, c0 = time.perf_counter(), time.process_time()
        for s in range(0, len(texts), batch):
            r.search(texts[s:s + batch], top_k=top_k)
        best["batched"] = min(best["batched"], time.perf_counter() - t0)
        best["batched_cpu"] = min(best["batched_cpu"], time.process_time() - c0)
        t0 = time.perf_counter()
        for q in texts[:500]:
            r.search([q], top_k=top_k)
        best["one_by_one"] = min(best["one_by_one"], (time.perf_counter() - t0) * len(texts) / 500)
    res["qps_batched"] = len(texts) / best["batched"]
    # queries per CPU-second of this (single-threaded) process = q/s of a worker that owns one core,
    # whatever else the machine is running at the time
    res["qps_batched_per_cpu_s"] = len(texts) / best["batched_cpu"]
    res["qps_one_by_one"] = len(texts) / best["one_by_one"]
    hits = r.search(texts, top_k=top_k)
    res[f"recall@{top_k}"] = float(np.mean([q["hops"][0] in [h.doc_id for h in hh] for q, hh in zip(qs, hits)]))
    r.close()
    return res


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", default="250000,1000000", help="comma-separated corpus sizes")
    p.add_argument("--words", type=int, default=100)
    p.add_argument("--queries", type=int, default=2000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--baseline-docs", type=int, default=100_000, help="bm25s one-shot baseline size (0: skip)")
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--keep", action="store_true", help="keep corpora and indexes")
    args = p.parse_args(argv)
    sizes = [int(x) for x in args.docs.split(",")]
    out: dict = {"sizes": [], "cpus": os.cpu_count()}
    for n in sizes:
        r = run_size(args.workdir, docs=n, words=args.words, seed=args.seed, queries=args.queries,
                     batch=args.batch, top_k=args.top_k)
        out["sizes"].append(r)
        print(json.dumps(r), flush=True)
        if args.baseline_docs and n == sizes[0]:
            b = _sub(_BASELINE, str(args.workdir / f"corpus_{n}.jsonl"), str(min(args.baseline_docs, n)))
            out["baseline_bm25s_one_shot"] = b
            print(json.dumps({"baseline_bm25s_one_shot": b}), flush=True)
        if not args.keep and n != sizes[-1]:
            import shutil

            shutil.rmtree(args.workdir / f"index_{n}", ignore_errors=True)
            (args.workdir / f"corpus_{n}.jsonl").unlink()
    s = out["sizes"]
    if len(s) >= 2:
        n0, n1 = s[0]["docs"], s[-1]["docs"]
        slope = (s[-1]["peak_rss_mb"] - s[0]["peak_rss_mb"]) / (n1 - n0)
        base = s[-1]["peak_rss_mb"] - slope * n1
    else:
        slope, base = s[-1]["peak_rss_mb"] / s[-1]["docs"], 0.0
    last = s[-1]
    ext = {"passages": WIKI18_PASSAGES,
           "peak_build_rss_gb": (base + slope * WIKI18_PASSAGES) / 1024,
           "rss_mb_per_1m_passages": slope * 1e6,
           "build_hours": last["build_s"] / last["docs"] * WIKI18_PASSAGES / 3600,
           "index_gb": last["index_mb"] / last["docs"] * WIKI18_PASSAGES / 1024,
           "store_gb": last["store_mb"] / last["docs"] * WIKI18_PASSAGES / 1024}
    if "baseline_bm25s_one_shot" in out:
        b = out["baseline_bm25s_one_shot"]
        ext["one_shot_bm25s_peak_rss_gb_linear"] = b["peak_rss_mb"] / b["docs"] * WIKI18_PASSAGES / 1024
    out["extrapolated_21m"] = ext
    print(json.dumps({"extrapolated_21m": ext}), flush=True)
    print(f"target: peak build RSS <= 8 GB at 21M: {'met' if ext['peak_build_rss_gb'] <= 8 else 'NOT met'}; "
          f"q/s at {last['docs']:,} >= 200 per worker (one core): "
          f"{'met' if last['qps_batched_per_cpu_s'] >= 200 else 'NOT met'}")
    return out


if __name__ == "__main__":
    main()
