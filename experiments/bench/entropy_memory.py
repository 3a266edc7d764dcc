"""Chunked exact token entropy vs the naive full-softmax entropy: extra memory and time.

    python -m experiments.bench.entropy_memory [--tokens 4096] [--vocab 151936] [--chunk-size 256 1024]

Baseline ("naive"): verl's ``entropy_from_logits`` formula over the whole ``[T, V]``
tensor in the input dtype::

    pd = softmax(logits); H = logsumexp(logits) - sum(pd * logits)

For bfloat16 input the table also shows ``naive-fp32`` (upcast first, as an exact
float32 entropy requires). Targets, against the naive row of the same dtype:
extra memory <= 1/8 and time <= 1.2x.

Extra memory is measured, not estimated: the process's resident-set high-water
mark (``VmHWM``) is reset before each call (``echo 5 > /proc/self/clear_refs``,
Linux) and read after it, minus the resident size before the call. The input
logits are allocated (and touched) before the reset, so they are not counted.
Where ``clear_refs`` is unavailable a psutil thread samples RSS every millisecond.
Torch's CPU allocator does not cache, and tensors this large are ``mmap``-ed, so
freed memory leaves the RSS at once. The analytic size of the intermediates is
printed next to the measurement.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import threading
import time
from typing import Callable

import torch

from tepo_ray.algo import token_entropy

GIB = 1024**3


# ----------------------------------------------------------------------------- memory probes
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _can_reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        _status_kb("VmHWM")
        return True
    except OSError:
        return False


class PeakRSS:
    """Context manager: peak RSS above the RSS at entry, in bytes (``.extra``)."""

    def __init__(self, use_hwm: bool):
        self.use_hwm = use_hwm
        self.extra = 0

    def __enter__(self) -> "PeakRSS":
        gc.collect()
        if self.use_hwm:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            self.base = _status_kb("VmRSS")
        else:
            import psutil

            proc = psutil.Process()
            self.base = proc.memory_info().rss
            self._peak = self.base
            self._stop = threading.Event()

            def sample() -> None:
                while not self._stop.is_set():
                    self._peak = max(self._peak, proc.memory_info().rss)
                    time.sleep(0.001)

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.use_hwm:
            self.extra = _status_kb("VmHWM") - self.base
        else:
            self._stop.set()
            self._thread.join()
            self.extra = self._peak - self.base


# ----------------------------------------------------------------------------- methods
def naive_entropy(logits: torch.Tensor) -> torch.Tensor:
    """verl's entropy_from_logits: full [T, V] softmax in the input dtype."""
    with torch.no_grad():
        pd = torch.softmax(logits, dim=-1)
        return torch.logsumexp(logits, dim=-1) - torch.sum(pd * logits, dim=-1)


def naive_entropy_fp32(logits: torch.Tensor) -> torch.Tensor:
    return naive_entropy(logits.float())


def float64_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Reference on a few rows: float64 log-softmax, p log p with 0 log 0 = 0."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    return -torch.where(logp.isneginf(), 0.0, logp.exp() * logp).sum(-1)


def measure(fn: Callable[[], torch.Tensor], *, use_hwm: bool) -> tuple[float, float, int, torch.Tensor]:
    """One call: (wall s, process CPU s, extra peak RSS bytes, output)."""
    with PeakRSS(use_hwm) as probe:
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    return wall, cpu, probe.extra, out.float()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--chunk-size", type=int, nargs="+", default=[128, 256, 512, 1024])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check-rows", type=int, default=64, help="rows checked against a float64 reference")
    args = ap.parse_args(argv)

    use_hwm = _can_reset_hwm()
    T, V = args.tokens, args.vocab
    print(f"# entropy_memory: T={T} V={V} torch={torch.__version__} threads={torch.get_num_threads()} "
          f"cpus={os.cpu_count()} {platform.machine()}; memory probe: "
          f"{'VmHWM reset (clear_refs)' if use_hwm else 'psutil RSS sampling (1 ms)'}; "
          f"median of {args.repeats} after 1 warm-up")
    t_start = time.perf_counter()
    rows = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        gen = torch.Generator().manual_seed(args.seed)
        logits = (torch.randn(T, V, generator=gen) * 4).to(dtype)  # [T, V], allocated before any probe
        input_gb = logits.numel() * logits.element_size() / GIB
        methods: list[tuple[str, Callable[[], torch.Tensor], float]] = [
            ("naive", lambda: naive_entropy(logits), 2 * T * V * logits.element_size()),
        ]
        if dtype != torch.float32:
            methods.append(("naive-fp32", lambda: naive_entropy_fp32(logits), 3 * T * V * 4))  # + the upcast copy
        for c in args.chunk_size:
            methods.append((f"chunked c={c}", lambda c=c: token_entropy(logits, chunk_size=c), min(c, T) * V * 4))
        # Rounds interleave the methods so that load from other processes hits all of them alike;
        # round 0 is a warm-up (its memory counts, its time does not).
        stats = {name: {"wall": [], "cpu": [], "mem": []} for name, _, _ in methods}
        outs: dict[str, torch.Tensor] = {}
        for rnd in range(args.repeats + 1):
            for name, fn, _ in methods:
                wall, cpu, mem, out = measure(fn, use_hwm=use_hwm)
                stats[name]["mem"].append(mem)
                if rnd > 0:
                    stats[name]["wall"].append(wall)
                    stats[name]["cpu"].append(cpu)
                outs[name] = out
                del out
        naive = stats["naive"]
        naive_wall, naive_cpu, naive_mem = (statistics.median(naive["wall"]), statistics.median(naive["cpu"]),
                                            max(naive["mem"]))
        naive_out = outs["naive"]
        ref = float64_entropy(logits[: args.check_rows])  # [R]
        for name, _, analytic in methods:
            st = stats[name]
            wall, cpu, mem = statistics.median(st["wall"]), statistics.median(st["cpu"]), max(st["mem"])
            err = float((outs[name][: args.check_rows].double() - ref).abs().max())
            rows.append((dtype_name, input_gb, name, wall, cpu, mem, analytic, wall / max(naive_wall, 1e-9),
                         cpu / max(naive_cpu, 1e-9), mem / max(naive_mem, 1), err))
        del outs
        del logits, naive_out, ref
        gc.collect()

    hdr = (f"{'dtype':9} {'input GiB':>9} {'method':16} {'wall s':>7} {'cpu s':>7} {'extra GiB':>10} {'analytic':>9} "
           f"{'wall/naive':>10} {'cpu/naive':>9} {'mem/naive':>9} {'err f64':>9}  targets (mem<=1/8, time<=1.2x)")
    print(hdr)
    print("-" * len(hdr))
    for dtype_name, input_gb, name, t, cpu, mem, analytic, tr, cr, mr, err in rows:
        ok = ""
        if name.startswith("chunked"):
            ok = f"mem {'OK' if mr <= 1 / 8 else 'MISS'}, time {'OK' if tr <= 1.2 else 'MISS'}"
        print(f"{dtype_name:9} {input_gb:9.2f} {name:16} {t:7.2f} {cpu:7.2f} {mem / GIB:10.3f} {analytic / GIB:9.3f} "
              f"{tr:10.2f} {cr:9.2f} {mr:9.3f} {err:9.2e}  {ok}")
    print("# analytic: naive = 2 [T, V] temporaries alive at its peak (softmax + logsumexp's shifted copy, then "
          "softmax + product), +1 fp32 copy for naive-fp32; chunked = one [c, V] float32 buffer.")
    print("# wall/cpu: median over rounds (cpu = process CPU time, less sensitive to other load); the time target "
          "uses wall. err f64: max |H - H_float64| over the first "
          f"{args.check_rows} tokens (naive bfloat16 computes its softmax in bfloat16, hence its error).")
    print(f"# load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cpus")
    print(f"# total wall time {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
