"""Per-call latency of the Python sandbox vs a bare interpreter spawn.

    python -m experiments.bench.sandbox_overhead [--n 200] [--cold 20]

Runs `print(1)` N times through a pre-started `PythonSandbox` (fork server: fresh process, limits, network
and mount isolation per call) and N times as a bare `subprocess.run([sys.executable, "-c", "print(1)"])`,
interleaved so both see the same machine load, and prints p50/p95 of each and their ratio. The issue's
target is sandbox p50 <= 1.2x bare p50. `--cold K` adds K calls of a sandbox without pre-started servers
(`prestarted=0`), i.e. what the pre-starting buys. A third interleaved variant turns the per-call PID
namespace off (`pid_namespace=False`) to show what that isolation costs.
"""

from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import sys
import time

from tepo_ray.tools.python_sandbox import PythonSandbox


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def _row(name: str, xs: list[float]) -> str:
    return (f"{name:<28s} n={len(xs):4d}  p50={_pct(xs, 0.5) * 1e3:8.2f} ms  p95={_pct(xs, 0.95) * 1e3:8.2f} ms  "
            f"mean={statistics.fmean(xs) * 1e3:8.2f} ms")


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200, help="calls per variant")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--cold", type=int, default=20, help="calls with prestarted=0 (0 to skip)")
    args = parser.parse_args(argv)

    bare: list[float] = []
    warm: list[float] = []
    no_pidns: list[float] = []
    with PythonSandbox(timeout_s=10.0, prestarted=2) as sandbox, \
            PythonSandbox(timeout_s=10.0, prestarted=2, pid_namespace=False) as flat:
        info = sandbox.ready()[0]
        for _ in range(args.warmup):
            sandbox.run("print(1)")
            flat.run("print(1)")
            subprocess.run([sys.executable, "-c", "print(1)"], capture_output=True, check=True)
        def in_sandbox(box: PythonSandbox) -> None:
            res = box.run("print(1)")
            if res.stdout != "1\n" or res.error is not None:
                raise RuntimeError(f"sandbox returned {res}")

        def bare_spawn() -> None:
            out = subprocess.run([sys.executable, "-c", "print(1)"], capture_output=True, check=True)
            if out.stdout != b"1\n":
                raise RuntimeError(f"bare interpreter printed {out.stdout!r}")

        variants = [(lambda: in_sandbox(sandbox), warm), (lambda: in_sandbox(flat), no_pidns), (bare_spawn, bare)]
        rng = random.Random(0)
        for _ in range(args.n):
            # A fresh random order each round: a call right after a bare interpreter spawn is measurably
            # slower, so no variant may always follow the same one.
            rng.shuffle(variants)
            for call, times in variants:
                t0 = time.perf_counter()
                call()
                times.append(time.perf_counter() - t0)
    cold: list[float] = []
    if args.cold:
        with PythonSandbox(timeout_s=10.0, prestarted=0) as sandbox:
            for _ in range(args.cold):
                t0 = time.perf_counter()
                sandbox.run("print(1)")
                cold.append(time.perf_counter() - t0)

    print(f"isolation: network={info['network']} mount_isolation={info['mount_isolation']} "
          f"drop_privileges={info['drop_privileges']} seccomp={info['seccomp']} "
          f"pid_namespace={info['pid_namespace']} memory_cap={info['memory_cap']}")
    print(_row("bare subprocess.run", bare))
    print(_row("sandbox (prestarted=2)", warm))
    print(_row("  same, pid_namespace=False", no_pidns))
    if cold:
        print(_row("sandbox (prestarted=0)", cold))
    ratio = _pct(warm, 0.5) / _pct(bare, 0.5)
    print(f"ratio sandbox p50 / bare p50 = {ratio:.3f}  (target <= 1.2; overhead {100 * (ratio - 1):+.1f} %)")
    print(f"ratio sandbox p95 / bare p95 = {_pct(warm, 0.95) / _pct(bare, 0.95):.3f}")
    print(f"ratio with / without PID namespace, p50 = {_pct(warm, 0.5) / _pct(no_pidns, 0.5):.3f}")
    return {"bare_p50": _pct(bare, 0.5), "sandbox_p50": _pct(warm, 0.5), "ratio_p50": ratio}


if __name__ == "__main__":
    main()
