"""Python tool-pool throughput vs worker count, with an Amdahl projection to larger pools.

    python -m experiments.bench.tool_pool_throughput [--workers 1,2] [--calls 40] [--snippet-ms 50]

What it measures: a CPU-bound snippet (sum of squares sized to take about
`--snippet-ms` in this interpreter) sent `--calls` times through
`ToolPool.map` to a pool of real `PythonToolWorker`s (real sandbox subprocesses),
each worker with one CPU and one call in flight. Throughput = calls / wall
seconds, best of `--repeats` interleaved rounds (the machine is shared).
Baseline in the same process and the same rounds: the same snippets run
serially through one `PythonSandbox` without Ray, so the pool's own overhead
shows as a ratio ("vs baseline": 1 worker should be close to 1.0).

Ray runs its workers at nice 15 by default; the benchmark starts Ray with
`worker_niceness=0` (`--worker-niceness`) so pool and baseline compete for the
cores on equal terms with the other processes on a shared machine.

Projection: from the measured speedup S(n_max) = T(n_max)/T(1), Amdahl's law
S(n) = 1 / ((1 - p) + p / n) gives the parallel fraction
p = (1 - 1/S) / (1 - 1/n_max); the table extrapolates S(n) for 4..64 workers
assuming one free core per worker. It is a projection, not a measurement.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Sequence

SQUARES = "print(sum(i * i for i in range({n})))  # call {k}"


def calibrate(target_ms: float) -> int:
    """n such that `sum(i*i for i in range(n))` takes about target_ms here."""
    n = 100_000
    while True:
        t0 = time.perf_counter()
        sum(i * i for i in range(n))
        dt = time.perf_counter() - t0
        if dt > 0.01:
            return max(1000, int(n * target_ms / 1000.0 / dt))
        n *= 4


def snippets(n: int, calls: int) -> list[str]:
    # Distinct text per call (nothing can be cached), same work.
    return [SQUARES.format(n=n, k=k) for k in range(calls)]


def amdahl_fraction(speedup: float, n: int) -> float:
    """p from S(n) = 1 / ((1 - p) + p / n), clipped to [0, 1]."""
    if n <= 1:
        raise ValueError("need a measurement with more than one worker")
    p = (1.0 - 1.0 / speedup) / (1.0 - 1.0 / n)
    return min(1.0, max(0.0, p))


def amdahl_speedup(p: float, n: int) -> float:
    return 1.0 / ((1.0 - p) + p / n)


def serial_round(box, code: list[str]) -> float:
    """Calls/s of `code` run one after another through an in-process PythonSandbox (no Ray, no pool)."""
    t0 = time.perf_counter()
    for c in code:
        res = box.run(c)
        if res.error is not None:
            raise RuntimeError(f"baseline snippet failed: {res}")
    return len(code) / (time.perf_counter() - t0)


def pool_round(pool, code: list[str], expected: str) -> tuple[float, float]:
    """(calls/s, median call latency in s) of one `pool.map` over `code`."""
    t0 = time.perf_counter()
    results = pool.map(code)
    dt = time.perf_counter() - t0
    bad = [r for r in results if r.error is not None or expected not in r.observation]
    if bad:
        raise RuntimeError(f"{len(bad)} of {len(results)} calls failed, first: {bad[0]}")
    return len(code) / dt, statistics.median(r.latency_s for r in results)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts to measure (first must be 1)")
    ap.add_argument("--calls", type=int, default=40, help="calls per round")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds per worker count (best is kept)")
    ap.add_argument("--snippet-ms", type=float, default=50.0)
    ap.add_argument("--num-cpus", type=int, default=None, help="ray.init num_cpus (default: max workers)")
    ap.add_argument("--worker-niceness", type=int, default=0,
                    help="nice value of Ray workers (Ray's own default is 15; 0 matches the in-process baseline)")
    ap.add_argument("--project", default="4,8,16,64", help="worker counts for the projection table")
    args = ap.parse_args(argv)
    counts = [int(x) for x in args.workers.split(",")]
    if counts[0] != 1 or len(counts) < 2:
        raise SystemExit("--workers must start with 1 and list at least two counts, e.g. 1,2")

    import os

    import ray

    from actors.tool_pool import ToolPool
    from tepo_ray.config import PythonToolConfig, RoleResources, ToolsConfig

    n = calibrate(args.snippet_ms)
    expected = str(sum(i * i for i in range(n)))
    code = snippets(n, args.calls)
    tools = ToolsConfig(
        python=PythonToolConfig(workers=1, max_workers=max(counts), call_timeout_s=30.0, cpu_time_s=30),
        max_inflight_per_worker=1,
        max_observation_chars=400,
    )
    print(f"snippet: sum of squares below n={n} (~{args.snippet_ms:.0f} ms in this interpreter), "
          f"{args.calls} calls per round, best of {args.repeats} rounds; os.cpu_count()={os.cpu_count()}, "
          f"load average {os.getloadavg()[0]:.1f} (other processes share these cores); "
          f"Ray worker niceness {args.worker_niceness}")

    from tepo_ray.tools.python_sandbox import PythonSandbox

    # Ray starts workers at nice 15 by default; on a shared machine that alone makes them lose to the
    # (nice 0) baseline and to everything else running, so compare at the same niceness unless asked.
    ray.init(num_cpus=args.num_cpus or max(counts), include_dashboard=False, logging_level="WARNING",
             _system_config={"worker_niceness": args.worker_niceness})
    # One pool, resized between rounds with scale(); baseline and pool sizes interleave in every round,
    # so load from other processes on this shared machine hits them alike.
    box = PythonSandbox.from_config(tools.python)
    pool = ToolPool.from_config("python", tools, RoleResources(num_cpus=1.0), workers=1,
                                max_workers=max(counts), health_interval_s=0)
    base: list[float] = []
    rates: dict[int, list[float]] = {w: [] for w in counts}
    p50: dict[int, list[float]] = {w: [] for w in counts}
    try:
        box.run(code[0])
        for _ in range(args.repeats):
            base.append(serial_round(box, code))
            for w in counts:
                pool.scale(w)
                pool.map(code[: 2 * w])  # warm the new workers' sandboxes
                rate, lat = pool_round(pool, code, expected)
                rates[w].append(rate)
                p50[w].append(lat)
        m = pool.metrics()
    finally:
        pool.close()
        box.close()
        ray.shutdown()
    print(f"pool metrics: calls={m['tools/python/calls']:.0f} errors={m['tools/python/errors']:.0f} "
          f"restarts={m['tools/python/restarts']:.0f} busy_fraction={m['tools/python/busy_fraction']:.2f} "
          f"scale_events={m['tools/python/scale_events']:.0f}")
    print(f"baseline  in-process PythonSandbox, serial: best {max(base):.2f} calls/s "
          f"(rounds: {', '.join(f'{b:.2f}' for b in base)})")
    base_best = max(base)
    print(f"          one snippet therefore takes ~{1000 / base_best:.0f} ms end to end in a sandbox here")

    best = {w: max(r) for w, r in rates.items()}
    print("\nmeasured (ToolPool.map, one call in flight per worker, num_cpus=1 each)")
    print(f"{'workers':>8} {'calls/s':>9} {'median':>9} {'speedup':>8} {'efficiency':>10} "
          f"{'p50 s*':>10} {'vs baseline':>11}")
    for w in counts:
        s = best[w] / best[1]
        print(f"{w:>8} {best[w]:9.2f} {statistics.median(rates[w]):9.2f} {s:8.2f} {s / w:10.2f} "
              f"{statistics.median(p50[w]):10.3f} {best[w] / base_best:11.2f}")
    print(f"* median call latency, all {args.calls} calls submitted at once (queue wait included)")
    n_max = counts[-1]
    s_max = best[n_max] / best[1]
    p = amdahl_fraction(s_max, n_max)
    print(f"\nspeedup {n_max} vs 1 workers: {s_max:.2f}x (parallel efficiency {s_max / n_max:.2f})")
    print(f"\nPROJECTION, not measured: Amdahl fit p={p:.3f} from the {n_max}-worker speedup, "
          "assuming one free core per worker")
    print(f"{'workers':>8} {'proj. speedup':>14} {'proj. calls/s':>14} {'efficiency':>10}")
    for w in [int(x) for x in args.project.split(",")]:
        s = amdahl_speedup(p, w)
        print(f"{w:>8} {s:14.2f} {best[1] * s:14.1f} {s / w:10.2f}")


if __name__ == "__main__":
    main()
