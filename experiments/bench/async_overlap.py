"""Async vs sync training wall time, with long-tailed generation, in one process.

    python -m experiments.bench.async_overlap [--steps 24 --staleness 1,2 --gen-delay 1.0 --gen-sigma 0.6]

Real training runs of the driver (`tepo_ray.driver.train`: real Ray actors, tiny
SFT-warm-started model, `hf` engine, python tool pool, scorer, learner) on one
local Ray (`num_cpus=2`), all with the same number of steps, groups per step and
group size (so the same number of trained samples):

* **sync**      — `async.max_staleness=0` (exact synchronous GRPO);
* **async-s<k>** — `async.max_staleness=k` for each k of `--staleness`, with a
  generous `async.max_inflight_groups`.

Generation is made long-tailed with `DelayInjectingGenerationWorker` (the real
rollout, then a log-normal sleep per group: median `--gen-delay`, log-sd
`--gen-sigma`), and training comparable in length with `DelayInjectingLearnerWorker`
(the real optimizer step, then a `--train-delay` sleep; by default the seeded
delays' realized longest-per-sync-batch mean + `--overhead`, so T_train ~ T_gen).
Every arm draws the same delay streams (same seeds).

From each run's `metrics.jsonl`, over steps >= 2 (step 1 carries engine warm-up):

* `T_train` = mean `learner/step_time_s` (real step + injected sleep), all arms;
* `T_gen`   = mean over sync steps of `time/step_s - learner/step_time_s`: the time
  to generate *and score* one batch (what a sync step cannot overlap with training).

Printed per async arm: `speedup = wall_sync / wall_async` (driver loop wall time,
`summary["wall_s"]`, actor start-up excluded), the ideal overlap bound
`(T_gen + T_train) / max(T_gen, T_train)`, `speedup / ideal`, the finite-run bound
`N (T_gen + T_train) / (T_gen + T_train + (N - 1) max(T_gen, T_train))` (the first
batch and the last step cannot overlap), and the steady-state speedup (mean
`time/step_s`). Issue targets: speedup >= 1.5x and >= 0.9 of ideal when generation
and training take similar time. Every arm's `async/staleness_max` (and the
learner's) must stay <= its bound: exit 1 otherwise.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tepo_ray.config import load_config
from tepo_ray.metrics import K, read_metrics

from experiments.bench.tiny_model import DEMO
from experiments.bench.tiny_model import TINY as _TINY

TINY = [*_TINY, "trainer.checkpoint_interval=0", "engine.name=hf"]
T_TRAIN_KEY = "learner/step_time_s"


def realized_sync_batch_delay(*, median: float, sigma: float, seed: int, generators: int, batch_groups: int,
                              steps: int) -> float:
    """Mean over steps >= 2 of the longest injected delay of each sync batch, drawn exactly as the run will.

    `DelayInjectingGenerationWorker` named `generator-<i>` draws from `Random(f"{seed}/generator-<i>")`,
    and the driver admits groups round-robin over generators; in a sync run batch k is groups
    k*B .. k*B+B-1, so its delays are known before the run (seeded), whatever order groups finish in.
    """
    streams = [random.Random(f"{seed}/generator-{g}") for g in range(generators)]
    maxima = []
    k = 0
    for _ in range(steps):
        delays = []
        for _ in range(batch_groups):
            delays.append(median * math.exp(sigma * streams[k % generators].gauss(0.0, 1.0)))
            k += 1
        maxima.append(max(delays))
    return statistics.fmean(maxima[1:] or maxima)


def _mean(xs: list[float]) -> float:
    return statistics.fmean(xs) if xs else float("nan")


def run_arm(*, name: str, overrides: list[str], run_root: Path, gen_kwargs: dict[str, Any],
            learner_kwargs: dict[str, Any]) -> dict[str, Any]:
    """One training run; returns its wall time and the per-step metrics it logged."""
    from actors.faults import DelayInjectingGenerationWorker, DelayInjectingLearnerWorker
    from tepo_ray.driver import train

    cfg = load_config([DEMO], [*overrides, f"logging.run_dir={run_root / name}", f"logging.name={name}"])
    t0 = time.perf_counter()
    summary = train(cfg, generator_cls=DelayInjectingGenerationWorker, generator_kwargs=gen_kwargs,
                    learner_cls=DelayInjectingLearnerWorker, learner_kwargs=learner_kwargs)
    total = time.perf_counter() - t0
    recs = read_metrics(summary["metrics"])
    steady = [r for r in recs if r[K.STEP] >= 2]
    t_train = [float(r[T_TRAIN_KEY]) for r in steady]
    step_s = [float(r[K.TIME_STEP]) for r in steady]
    return {
        "name": name,
        "staleness_bound": int(cfg.async_.max_staleness),
        "steps": int(summary["steps"]),
        "samples": sum(len(r.get(K.ITEMS, [])) for r in recs) * int(cfg.algo.group_size),
        "wall_s": float(summary["wall_s"]),
        "total_s": total,
        "step_s": _mean(step_s),
        "t_train": _mean(t_train),
        "t_gen": _mean([s - t for s, t in zip(step_s, t_train)]),
        "staleness_max": max(max(int(r[K.STALENESS_MAX]), int(r.get("learner/staleness_max", 0))) for r in recs),
        "staleness_mean": _mean([float(r[K.STALENESS_MEAN]) for r in recs]),
        "dropped": int(recs[-1][K.DROPPED_STALE]),
        "admitted": int(recs[-1][K.ADMITTED]),
        "calls": _mean([float(r[K.CALLS]) for r in recs]),
        "run_dir": summary["run_dir"],
    }


def _arm_row(a: dict[str, Any]) -> str:
    return (f"{a['name']:<8} {a['staleness_bound']:>5d} {a['steps']:>5d} {a['samples']:>7d} "
            f"{a['wall_s']:>7.2f} {a['step_s']:>7.3f} {a['t_train']:>7.3f} {a['t_gen']:>9.3f} "
            f"{a['staleness_max']:>9d} {a['staleness_mean']:>10.2f} {a['dropped']:>7d} {a['admitted']:>8d} "
            f"{a['calls']:>10.2f}")


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=24, help="learner steps per arm")
    ap.add_argument("--batch-groups", type=int, default=2, help="async.rollout_batch_groups (groups per step)")
    ap.add_argument("--group-size", type=int, default=4, help="algo.group_size")
    ap.add_argument("--staleness", default="1,2", help="async arms' async.max_staleness values (each >= 1)")
    ap.add_argument("--generators", type=int, default=1, help="topology.generators.replicas")
    ap.add_argument("--gen-delay", type=float, default=1.0, help="median injected generation delay per group (s)")
    ap.add_argument("--gen-sigma", type=float, default=0.6, help="log-sd of the generation delay (long tail)")
    ap.add_argument("--train-delay", type=float, default=None,
                    help="injected learner delay per step (s); default: the sync batches' realized longest "
                         "generation delay + --overhead, so that T_train ~ T_gen")
    ap.add_argument("--overhead", type=float, default=0.1,
                    help="(real rollout + scoring) - (real learner step) per batch, for the default --train-delay")
    ap.add_argument("--cache-dir", default=None, help="model.cache_dir (tiny model + SFT; default: config's)")
    ap.add_argument("--out", default=None, help="where run dirs go (default: a temporary directory)")
    ap.add_argument("overrides", nargs="*", help="extra config overrides (key=value)")
    args = ap.parse_args(argv)
    try:
        bounds = [int(x) for x in args.staleness.split(",") if x.strip()]
    except ValueError:
        bounds = []
    if not bounds or min(bounds) < 1:
        ap.error(f"--staleness {args.staleness!r}: expected comma-separated ints >= 1 (0 is the sync arm)")

    import ray

    B, G, N = args.batch_groups, args.group_size, args.steps
    realized = realized_sync_batch_delay(median=args.gen_delay, sigma=args.gen_sigma, seed=0,
                                         generators=args.generators, batch_groups=B, steps=N)
    train_delay = args.train_delay if args.train_delay is not None else max(0.0, realized + args.overhead)
    run_root = Path(args.out or tempfile.mkdtemp(prefix="tepo_async_overlap_"))
    common = [
        *TINY,
        *([f"model.cache_dir={args.cache_dir}"] if args.cache_dir else []),
        f"trainer.steps={N}",
        f"async.rollout_batch_groups={B}",
        f"algo.group_size={G}",
        f"async.max_inflight_groups={max(8, 4 * B * (max(bounds) + 1))}",
        f"topology.generators.replicas={args.generators}",
        f"topology.generators.num_cpus={0.5 / args.generators}",
        *args.overrides,
    ]
    gen_kwargs = dict(delay_median_s=args.gen_delay, delay_sigma=args.gen_sigma, delay_seed=0)
    learner_kwargs = dict(train_delay_s=train_delay, delay_seed=0)

    # build (or reuse) the tiny model + SFT warm start before timing anything
    from tepo_ray.prepare import prepare_data

    t0 = time.perf_counter()
    prepare_data(load_config([DEMO], common), progress=False)
    prep_s = time.perf_counter() - t0
    if not ray.is_initialized():
        ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, object_store_memory=512 * 1024**2,
                 _system_config={"worker_niceness": 0})
    print(f"setup: {N} steps x {B} groups x {G} samples per arm; generators={args.generators}; "
          f"gen delay per group: log-normal, median {args.gen_delay}s, sigma {args.gen_sigma} "
          f"(sync batches' longest: {realized:.2f}s on average); train delay {train_delay:.2f}s; "
          f"prepare_data {prep_s:.1f}s; runs under {run_root}", flush=True)
    arms = []
    for name, s in (("sync", 0), *((f"async-s{b}", b) for b in bounds)):
        arm = run_arm(name=name, overrides=[*common, f"async.max_staleness={s}"], run_root=run_root,
                      gen_kwargs=gen_kwargs, learner_kwargs=learner_kwargs)
        print(f"  {name}: wall {arm['wall_s']:.1f}s (with actor start-up {arm['total_s']:.1f}s)", flush=True)
        arms.append(arm)
    ray.shutdown()
    sync = arms[0]

    print(f"\n{'arm':<8} {'bound':>5} {'steps':>5} {'samples':>7} {'wall_s':>7} {'step_s':>7} {'T_train':>7} "
          f"{'gen+score':>9} {'stale_max':>9} {'stale_mean':>10} {'dropped':>7} {'admitted':>8} {'calls/traj':>10}")
    for a in arms:
        print(_arm_row(a))
    print("(step_s, T_train, gen+score = time/step_s - T_train: means over steps >= 2; in an async arm "
          "gen+score is only what the learner waited for)")

    t_gen, t_train = sync["t_gen"], _mean([a["t_train"] for a in arms])
    ideal = (t_gen + t_train) / max(t_gen, t_train)
    ideal_n = N * (t_gen + t_train) / (t_gen + t_train + (N - 1) * max(t_gen, t_train))
    print(f"\nT_gen (sync: generate + score one batch) = {t_gen:.3f}s   T_train = {t_train:.3f}s   "
          f"T_gen / T_train = {t_gen / t_train:.2f}")
    print(f"ideal overlap bound (T_gen+T_train)/max = {ideal:.3f}x;  finite-run bound for N={N} "
          f"(first batch + last step cannot overlap) = {ideal_n:.3f}x")
    results: dict[str, dict[str, float]] = {}
    ok = sync["staleness_max"] <= 0
    for a in arms[1:]:
        speedup = sync["wall_s"] / a["wall_s"]
        steady = sync["step_s"] / a["step_s"]
        print(f"[{a['name']}] speedup wall_sync / wall_async = {speedup:.3f}x (target >= 1.5x);  "
              f"speedup / ideal = {speedup / ideal:.3f} (target >= 0.9);  / finite-run bound = "
              f"{speedup / ideal_n:.3f};  steady-state (mean step_s, steps >= 2) {steady:.3f}x, / ideal = "
              f"{steady / ideal:.3f}")
        print(f"[{a['name']}] staleness max {a['staleness_max']} (bound {a['staleness_bound']}); "
              f"dropped stale {a['dropped']}")
        ok = ok and a["staleness_max"] <= a["staleness_bound"]
        results[a["name"]] = {"speedup": speedup, "ideal": ideal, "ratio": speedup / ideal, "steady": steady,
                              "t_gen": t_gen, "t_train": t_train}
    print(f"[sync] staleness max {sync['staleness_max']} (bound 0); dropped stale {sync['dropped']}")
    if not ok:
        print("FAIL: a trained sample exceeded its run's staleness bound", file=sys.stderr)
        raise SystemExit(1)
    return results


if __name__ == "__main__":
    main()
