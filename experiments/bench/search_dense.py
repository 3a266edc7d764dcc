"""Dense backends side by side: chromadb vs faiss (Flat, HNSW) vs bm25 on one corpus, same encoder.

    python -m experiments.bench.search_dense [--docs 2000] [--queries 200]

Builds each index from the same generated wiki-18-format corpus through `build_index` (chroma and
faiss embed with the packaged all-MiniLM-L6-v2 on CPU), then times batched search and recall@3 of
the planted document. Build time is per passage so it extrapolates; faiss HNSW reuses the Flat
build's embeddings (only the index is rebuilt), so its row reports the index build alone.
Ratios are against bm25 in the same run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from tepo_ray.data.corpus import generate_single_hop_questions, generate_world, write_corpus
from tepo_ray.tools.retrieval import build_index, open_retriever


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=2000)
    p.add_argument("--queries", type=int, default=200)
    args = p.parse_args(argv)
    world = generate_world(num_docs=args.docs, seed=0)
    qs = generate_single_hop_questions(world, n=args.queries, seed=1)
    texts = [q["question"] for q in qs]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_corpus(root / "c.jsonl", world.docs)
        plans = [("bm25", "bm25", {}, None), ("chroma", "chroma", {}, None), ("faiss Flat", "faiss", {}, None),
                 ("faiss HNSW", "faiss", {"index_type": "HNSW"}, "faiss Flat")]
        for name, backend, opts, reuse in plans:
            out = root / name.replace(" ", "_")
            if reuse:
                shutil.copytree(root / reuse.replace(" ", "_"), out)
            t0 = time.perf_counter()
            build_index(root / "c.jsonl", out, backend=backend, progress=False, writer_options=opts)
            build_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            r = open_retriever(out)
            open_s = time.perf_counter() - t0
            r.search(texts[:10], top_k=3)
            t0, c0 = time.perf_counter(), time.process_time()
            hits = []
            for s in range(0, len(texts), 32):
                hits += r.search(texts[s:s + 32], top_k=3)
            dt, cpu = time.perf_counter() - t0, time.process_time() - c0
            r.close()
            recall = float(np.mean([q["hops"][0] in [h.doc_id for h in hh] for q, hh in zip(qs, hits)]))
            rows.append({"backend": name, "build_s": build_s, "build_ms_per_passage": build_s / args.docs * 1e3,
                         "open_s": open_s, "qps": len(texts) / dt, "qps_per_cpu_s": len(texts) / cpu,
                         "recall@3": recall, "disk_mb": sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
                         / 2**20})
            print(json.dumps(rows[-1]), flush=True)
    base = rows[0]
    for r in rows:
        print(f"{r['backend']:>12}: build {r['build_ms_per_passage']:.2f} ms/passage "
              f"({r['build_ms_per_passage'] / base['build_ms_per_passage']:.1f}x bm25), {r['qps']:.0f} q/s "
              f"({r['qps'] / base['qps']:.2f}x bm25), recall@3 {r['recall@3']:.2f}, {r['disk_mb']:.1f} MB")
    return rows


if __name__ == "__main__":
    main()
