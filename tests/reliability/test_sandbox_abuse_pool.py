"""Abusive snippets through the Ray-hosted python tool pool, many at once, while normal calls keep
succeeding. Records p50/p99 latency of the normal calls with and without abuse (in the report)."""

from __future__ import annotations

import asyncio
import statistics
import time

import pytest

from tepo_ray.config import PythonToolConfig, RoleResources, ToolsConfig

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ABUSE = {
    "fork-bomb": "import os\nwhile True:\n    os.fork()",
    "memory-hog": "x = []\nwhile True:\n    x.append(bytearray(50 << 20))",
    "busy-loop": "while True:\n    pass",
    "output-flood": "while True:\n    print('A' * 10000)",
    "sleep-forever": "import time\ntime.sleep(3600)",
    "thread-spawn": "import threading, time\nfor _ in range(10000):\n    threading.Thread(target=time.sleep, args=(60,)).start()",
}


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def test_abusive_calls_do_not_break_normal_calls(ray_cluster, record_property):
    from actors.tool_pool import ToolPool

    tools = ToolsConfig(python=PythonToolConfig(workers=2, prestarted=2, call_timeout_s=3.0, cpu_time_s=2,
                                                memory_mb=256, max_processes=16), max_inflight_per_worker=4)
    pool = ToolPool.from_config("python", tools, RoleResources(num_cpus=0.25), health_interval_s=0)
    try:
        async def normal(n: int) -> list[float]:
            out = []
            for k in range(n):
                r = await pool.call(f"print({k} * 7)")
                assert r.error is None and r.observation.strip().endswith(str(k * 7)), r
                out.append(r.latency_s)
            return out

        async def run():
            base = sum(await asyncio.gather(*[normal(8) for _ in range(2)]), [])
            t0 = time.perf_counter()
            abusive = [pool.call(code) for code in ABUSE.values() for _ in range(2)]
            res = await asyncio.gather(asyncio.gather(*abusive), *[normal(8) for _ in range(2)])
            abuse_wall = time.perf_counter() - t0
            return base, sum(res[1:], []), res[0], abuse_wall

        base, loaded, abusive, abuse_wall = asyncio.run(run())
        for (name, _), r in zip([(n, c) for n, c in ABUSE.items() for _ in range(2)], abusive):
            assert r.error is not None, (name, r)  # each ends as an error observation, bounded
            assert len(r.observation) <= 4 * tools.python.max_output_chars, (name, len(r.observation))
        stats = {"p50_without_abuse_s": statistics.median(base), "p99_without_abuse_s": _pct(base, 0.99),
                 "p50_with_abuse_s": statistics.median(loaded), "p99_with_abuse_s": _pct(loaded, 0.99),
                 "abuse_calls": len(abusive), "abuse_wall_s": abuse_wall}
        for k, v in stats.items():
            record_property(k, round(v, 3) if isinstance(v, float) else v)
        # every abusive call was bounded by its timeout (+ grace), even 12 at once on 2 workers
        assert max(r.latency_s for r in abusive) < 3 * (tools.python.call_timeout_s + 5)
        m = pool.metrics()
        assert any(k.endswith("workers") and v >= 1 for k, v in m.items())
    finally:
        pool.close()
