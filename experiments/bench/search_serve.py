"""Ray Serve `DeploymentHandle` vs today's `ToolPool` for the search tool: per-call overhead and throughput.

    python -m experiments.bench.search_serve [--docs 20000] [--calls 400] [--replicas 1,2,4]

Both paths run the *same* worker class in the same Ray session: `SearchToolWorker` over one real
bm25 index (a real search), and `EchoWorker` (returns its argument: a plain Python call, so its
latency is pure transport overhead). For each path:

* latency: ``--calls`` sequential calls from the driver (ToolPool: ``call_sync``; Serve:
  ``handle.execute.remote(...).result()``), p50/p99;
* throughput: ``--calls`` x 4 calls in flight at once (ToolPool: ``map``; Serve: all
  ``.remote()`` first, then ``.result()``), at 1..4 workers / replicas (0.25 CPU each,
  ``max_ongoing_requests`` = the pool's ``max_inflight_per_worker``).

Serve is adopted for the tool services where its extra p50 latency on a search call is <= 10 %
of a typical search call (the pool's p50); the report line says which way the numbers fall.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from actors.tool_pool import SearchToolWorker, ToolPool, ToolWorker
from tepo_ray.config import RoleResources, SearchToolConfig, ToolsConfig
from tepo_ray.tools.pool_core import WorkerReply


class EchoWorker(ToolWorker):
    """Returns its argument: the cost of a call through a transport, with no tool work."""

    tool = "search"

    def __init__(self, cfg, *, max_observation_chars: int = 400, concurrency: int = 1) -> None:
        super().__init__()

    def _run(self, argument: str, timeout_s: float) -> WorkerReply:
        return WorkerReply(observation=argument)


def _pct(xs: list[float]) -> tuple[float, float]:
    a = np.asarray(xs) * 1e3
    return float(np.percentile(a, 50)), float(np.percentile(a, 99))


def _pool(worker_cls, cfg: SearchToolConfig, n: int, inflight: int) -> ToolPool:
    tools = ToolsConfig(search=cfg, max_observation_chars=2000, max_inflight_per_worker=inflight)
    cfg.workers = cfg.min_workers = cfg.max_workers = n
    return ToolPool.from_config("search", tools, RoleResources(num_cpus=0.25), health_interval_s=0,
                                worker_cls=worker_cls)


def _serve(worker_cls, cfg: SearchToolConfig, n: int, inflight: int):
    from ray import serve

    @serve.deployment(num_replicas=n, ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=inflight)
    class SearchService:
        def __init__(self) -> None:
            self.worker = worker_cls(cfg, max_observation_chars=2000)

        def execute(self, argument: str, timeout_s: float) -> WorkerReply:
            return self.worker.execute(argument, timeout_s)

    return serve.run(SearchService.bind(), name=f"search_{worker_cls.__name__}_{n}", route_prefix=None)


def measure(kind: str, call, submit_all, queries: list[str], calls: int) -> dict:
    for q in queries[:20]:
        call(q)  # warm-up
    lat = []
    for q in queries[:calls]:
        t0 = time.perf_counter()
        call(q)
        lat.append(time.perf_counter() - t0)
    burst = (queries * 8)[: calls * 4]
    t0 = time.perf_counter()
    submit_all(burst)
    dt = time.perf_counter() - t0
    p50, p99 = _pct(lat)
    return {"path": kind, "p50_ms": p50, "p99_ms": p99, "throughput_per_s": len(burst) / dt}


def main(argv: list[str] | None = None) -> dict:
    import ray
    from ray import serve

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=20_000)
    p.add_argument("--calls", type=int, default=400)
    p.add_argument("--replicas", default="1,2,4")
    p.add_argument("--inflight", type=int, default=4)
    args = p.parse_args(argv)

    from tepo_ray.data.corpus import generate_single_hop_questions, generate_world, write_corpus
    from tepo_ray.tools.retrieval import build_index

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", configure_logging=True)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    results: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        world = generate_world(num_docs=args.docs, seed=0)
        rng = random.Random(0)
        filler = [f"w{i}x" for i in range(50_000)]
        docs = [{"id": d["id"], "contents": d["contents"] + " " + " ".join(rng.choices(filler, k=80))}
                for d in world.docs]
        write_corpus(Path(tmp) / "c.jsonl", docs)
        build_index(Path(tmp) / "c.jsonl", Path(tmp) / "ix", progress=False)
        queries = [q["question"] for q in generate_single_hop_questions(world, n=max(args.calls, 500), seed=1)]
        cfg = SearchToolConfig(index_dir=str(Path(tmp) / "ix"), top_k=3)
        for worker_cls in (SearchToolWorker, EchoWorker):
            for n in [int(x) for x in args.replicas.split(",")]:
                with _pool(worker_cls, cfg, n, args.inflight) as pool:
                    r = measure("ToolPool", lambda q: pool.call_sync(q), pool.map, queries, args.calls)
                results.append({"worker": worker_cls.__name__, "replicas": n, **r})
                print(json.dumps(results[-1]), flush=True)
                h = _serve(worker_cls, cfg, n, args.inflight)

                def serve_all(qs, h=h):
                    rs = [h.execute.remote(q, 5.0) for q in qs]
                    return [x.result() for x in rs]

                r = measure("Serve", lambda q, h=h: h.execute.remote(q, 5.0).result(), serve_all, queries, args.calls)
                serve.delete(f"search_{worker_cls.__name__}_{n}")
                results.append({"worker": worker_cls.__name__, "replicas": n, **r})
                print(json.dumps(results[-1]), flush=True)
    serve.shutdown()
    ray.shutdown()

    def get(worker, path, n):
        return next(r for r in results if r["worker"] == worker and r["path"] == path and r["replicas"] == n)

    n0 = int(args.replicas.split(",")[0])
    pool_search, serve_search = get("SearchToolWorker", "ToolPool", n0), get("SearchToolWorker", "Serve", n0)
    extra = serve_search["p50_ms"] - pool_search["p50_ms"]
    verdict = {"serve_extra_p50_ms": extra, "typical_search_call_p50_ms": pool_search["p50_ms"],
               "serve_overhead_fraction": extra / pool_search["p50_ms"],
               "adopt_serve": extra <= 0.10 * pool_search["p50_ms"]}
    print(json.dumps(verdict))
    return {"results": results, "verdict": verdict}


if __name__ == "__main__":
    main()
