"""Search tool throughput: index build time and BM25 queries/s, batched vs one query per call.

    python -m experiments.bench.search_qps [--docs 100000] [--queries 2000] [--batch 256] [--top-k 3]

Generates a synthetic wiki-18 corpus (`tepo_ray.data.corpus`), builds the bm25 index through the
real streaming path (`build_index`: jsonl -> store.sqlite -> bm25s matrix), then times the same
questions (half single-hop, half multi-hop) through `BM25Retriever.search`:

* batched:     ``search(queries[i:i+batch])`` -- what a search worker does with a queue of calls;
* 2 threads:   the same, with the batch split over 2 threads (``BM25Retriever(num_threads=2)``);
* one-by-one:  ``search([q])`` per query -- the baseline, run in the same process;
* numpy:       the numpy scorer (the fallback when numba is missing), batched;
* bm25s:       bm25s's own ``retrieve`` (numpy backend) on the same saved index, on a subset.

Variants run in interleaved rounds (``--repeats``) and the best round of each is reported, so
machine load from other processes hits all of them alike. Every figure includes tokenization and
reading the hit documents from the store. The issue's target
is >= 500 queries/s batched on 2 cores. Ratios are against one-by-one.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from tepo_ray.data.corpus import (generate_multihop_questions, generate_single_hop_questions, generate_world,
                                  write_corpus)
from tepo_ray.tools.retrieval import build_index
from tepo_ray.tools.retrieval.bm25 import BM25Retriever, numba_available, tokenize


def _qps(fn, queries: list[str], *, batch: int) -> tuple[float, float]:
    """(seconds, queries/s) for running ``fn`` over ``queries`` in chunks of ``batch``."""
    t0 = time.perf_counter()
    for s in range(0, len(queries), batch):
        fn(queries[s:s + batch])
    dt = time.perf_counter() - t0
    return dt, len(queries) / dt


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=256, help="queries per search call in the batched run")
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timing rounds (best is reported)")
    parser.add_argument("--bm25s-queries", type=int, default=300, help="subset for the slow bm25s baseline (0: skip)")
    parser.add_argument("--workdir", type=Path, default=None, help="where to write corpus and index (default: temp)")
    args = parser.parse_args(argv)

    console = Console()
    rows: list[tuple[str, str, str, str]] = []
    result: dict = {"docs": args.docs, "queries": args.queries, "batch": args.batch, "top_k": args.top_k,
                    "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)

        t0 = time.perf_counter()
        world = generate_world(num_docs=args.docs, seed=args.seed)
        result["generate_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        write_corpus(work / "corpus.jsonl", world.docs)
        result["write_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        report = build_index(work / "corpus.jsonl", work / "index", progress=False, batch_size=10_000)
        result["build_s"] = time.perf_counter() - t0
        assert report.num_docs == args.docs, report
        rows += [("generate corpus", f"{result['generate_s']:.2f} s", f"{args.docs / result['generate_s']:,.0f} docs/s", ""),
                 ("write jsonl", f"{result['write_s']:.2f} s", "", ""),
                 ("build bm25 index", f"{result['build_s']:.2f} s", f"{args.docs / result['build_s']:,.0f} docs/s", "")]

        half = args.queries // 2
        qs = generate_single_hop_questions(world, n=half, seed=1) + generate_multihop_questions(
            world, n=args.queries - half, seed=2)
        queries = [q["question"] for q in qs]

        t0 = time.perf_counter()
        r = BM25Retriever(work / "index")
        result["open_s"] = time.perf_counter() - t0
        result["scorer"] = r.scorer
        rows.append((f"open retriever ({r.scorer})", f"{result['open_s']:.2f} s", "", ""))
        threaded = BM25Retriever(work / "index", num_threads=2)
        variants = [("one-by-one", r, 1), (f"batched x{args.batch}", r, args.batch),
                    (f"batched x{args.batch}, 2 threads", threaded, args.batch)]
        if r.scorer != "numpy":
            variants.append((f"batched x{args.batch} numpy scorer", BM25Retriever(work / "index", scorer="numpy"),
                             args.batch))
        for _, rr, _ in variants:
            rr.search(queries[:50], top_k=args.top_k)  # warm caches
        # Interleaved rounds so every variant sees the same machine load; best round reported.
        best: dict[str, float] = {}
        for _ in range(args.repeats):
            for name, rr, batch in variants:
                dt, _qps_ = _qps(lambda b, rr=rr: rr.search(b, top_k=args.top_k), queries, batch=batch)
                best[name] = min(best.get(name, float("inf")), dt)
        base_qps = len(queries) / best["one-by-one"]
        for name, _, _ in variants:
            qps = len(queries) / best[name]
            result[f"qps[{name}]"] = qps
            rows.append((f"search {name}", f"{best[name]:.2f} s", f"{qps:,.0f} q/s", f"{qps / base_qps:.2f}x"))
        batch_qps = result[f"qps[batched x{args.batch}]"]
        result["batched_vs_one_by_one"] = batch_qps / base_qps
        results = r.search(queries, top_k=args.top_k)
        recall = sum(q["hops"][0] in [h.doc_id for h in hits] for q, hits in zip(qs, results)) / len(qs)
        result["recall_at_k_first_hop"] = recall
        single_qps = base_qps
        for _, rr, _ in variants:
            rr.close()

        if args.bm25s_queries:
            import bm25s

            ref = bm25s.BM25.load(str(work / "index" / "bm25"), load_vocab=True, mmap=True, show_progress=False)
            sub = queries[: args.bm25s_queries]

            def bm25s_search(batch: list[str]) -> None:
                toks = [[t for t in tokenize(q) if t in ref.vocab_dict] for q in batch]
                ref.retrieve(toks, k=args.top_k, show_progress=False, n_threads=0)

            dt, qps = _qps(bm25s_search, sub, batch=args.batch)
            result["bm25s_numpy_batched_qps"] = qps
            rows.append((f"bm25s.retrieve numpy x{args.batch} ({len(sub)} q)", f"{dt:.2f} s", f"{qps:,.0f} q/s",
                         f"{qps / single_qps:.2f}x"))

    table = Table(title=f"search tool: {args.docs:,} docs, {args.queries} queries, top-{args.top_k}, "
                        f"{os.cpu_count()} CPUs (numba {'available' if numba_available() else 'missing'})")
    for col in ("phase", "time", "throughput", "vs one-by-one"):
        table.add_column(col, justify="left" if col == "phase" else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    console.print(f"recall@{args.top_k} of the first-hop document: {recall:.3f}; target >= 500 q/s batched: "
                  f"{'met' if batch_qps >= 500 else 'NOT met'}")
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}))
    return result


if __name__ == "__main__":
    main()
