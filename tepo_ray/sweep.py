"""The comparison: GRPO vs TEPO-sparse vs TEPO-dense (one arm per α), from one SFT checkpoint, several seeds.

`run_sweep(cfg, out_dir=...)`:

1. Prepares the data and the SFT warm start once (`prepare_data`); every arm
   and seed starts from that same checkpoint (`model.path` is set to it), so the
   arms differ only in `algo.mode` / `algo.alpha` and the seed.
2. Trains every (arm, seed) as `tepo-ray train` in its own process, connected
   to one Ray cluster (started here, or `--address`). Each run makes its own
   placement group (`Driver.start`), so as many runs go at once as placement
   groups fit the cluster (`sweep.max_concurrent` caps it; on a 2-CPU box the
   demo topology fits once, so runs go one after another).
3. Evaluates the SFT checkpoint and every run's final weights greedily on the
   held-out split (`tepo_ray.evaluate.evaluate`, real tools).
4. Writes `report.md` + `report.json` (per arm: accuracy, F1, calls per
   question, tool-use efficiency, ΔH, m/n; mean ± std over seeds, and each arm
   against the SFT model with a paired bootstrap CI over items), learning curves
   and ΔH distributions (`curves_all.png`, `curves_<arm>.png`).

Each run logs to W&B (offline by default) in project `logging.wandb_project`,
group `logging.wandb_group` (default: the sweep directory's name), run name
`<arm>-s<seed>`, with the resolved config, which holds `sweep.arm`, as W&B config.

Tool-use efficiency here = mean score / calls per question (score per call;
undefined with no calls). Mean ΔH and m/n come from the training metrics of the
last quarter of the steps (evaluation is greedy and does not score entropies).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf

__all__ = ["Arm", "sweep_arms", "paired_bootstrap", "eval_policy", "latest_weights", "final_policy", "tool_efficiency", "run_sweep",
           "write_sweep_report"]


@dataclass(frozen=True)
class Arm:
    name: str
    mode: str
    alpha: float | None = None

    def overrides(self) -> list[str]:
        out = [f"algo.mode={self.mode}"]
        if self.alpha is not None:
            out.append(f"algo.alpha={self.alpha}")
        return out


def sweep_arms(sweep_cfg: Any) -> list[Arm]:
    """grpo, sparse and one dense arm per α, in `sweep.arms` order."""
    arms: list[Arm] = []
    for mode in sweep_cfg.arms:
        if mode == "dense":
            arms += [Arm(f"dense-a{a:g}", "dense", float(a)) for a in sweep_cfg.alphas]
        else:
            arms.append(Arm(str(mode), str(mode)))
    return arms


def tool_efficiency(score: float, calls: float) -> float | None:
    """Score per tool call (None with no calls)."""
    return score / calls if calls > 0 else None


def paired_bootstrap(a: Sequence[float], b: Sequence[float], *, n_boot: int = 2000, seed: int = 0,
                     confidence: float = 0.95) -> dict[str, float]:
    """Mean of b − a over paired items and a percentile bootstrap CI (items resampled with replacement).

    The noise of an eval difference from the finite held-out set: greedy decoding is
    deterministic, so re-running the same model gives the same numbers; the items are the noise.
    """
    import numpy as np

    if len(a) != len(b) or not a:
        raise ValueError(f"paired_bootstrap needs two equal non-empty lists, got {len(a)} and {len(b)}")
    d = np.asarray(b, dtype=float) - np.asarray(a, dtype=float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(d), size=(n_boot, len(d)))
    means = d[idx].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - confidence) / 2, (1 + confidence) / 2])
    return {"diff": float(d.mean()), "ci_low": float(lo), "ci_high": float(hi), "n": len(d),
            "p_le_0": float((means <= 0).mean())}


def eval_policy(cfg: DictConfig, *, model_path: str, out_dir: str | Path, weights: str | None = None,
                entropy: bool = True, temperature: float = 0.0, samples: int = 1, seed: int | None = None
                ) -> dict[str, Any]:
    """Held-out eval (tepo_ray.evaluate; greedy by default, else `samples` per item at `temperature`) plus
    per-item means of correctness / score / calls (ordered by item id) and efficiency.

    ΔH per call and m/n come from the eval's own entropy scoring (`entropy` is kept for callers; the
    scoring always runs).
    """
    from tepo_ray.evaluate import evaluate
    from tepo_ray.records import read_jsonl

    out = Path(out_dir)
    report = evaluate(cfg, model_path=model_path, out_dir=out, weights=weights, temperature=temperature,
                      samples=samples, seed=seed)
    held = report["datasets"]["held_out"]
    trajs = sorted(read_jsonl(out / "eval_trajectories_held_out.jsonl"), key=lambda t: t.prompt_id)
    res: dict[str, Any] = {**held, "model_path": report["model_path"], "weights": report.get("weights")}
    n = max(len(trajs), 1)
    res["score_mean"] = sum(float(t.score or 0.0) for t in trajs) / n
    res["calls_per_traj"] = sum(t.num_calls for t in trajs) / n
    # ΔH per call was scored by the eval's entropy scorer with the policy that generated each trajectory
    dh = [c.delta_entropy for t in trajs for c in t.tool_calls if c.delta_entropy is not None]
    with_calls = [t for t in trajs if t.num_calls]
    res["delta_h_mean"] = sum(dh) / len(dh) if dh else None
    res["m_over_n"] = (sum(t.num_decreasing / t.num_calls for t in with_calls) / len(with_calls)
                       if with_calls else None)
    by_item: dict[str, list[Any]] = {}
    for t in trajs:
        by_item.setdefault(t.prompt_id, []).append(t)

    def per_item(fn: Any) -> list[float]:
        return [sum(fn(t) for t in ts) / len(ts) for ts in by_item.values()]

    res["item_ids"] = list(by_item)
    res["item_scores"] = per_item(lambda t: float(t.score or 0.0))
    res["item_correct"] = per_item(lambda t: 1.0 if (t.score or 0.0) >= 1.0 else 0.0)
    res["item_calls"] = per_item(lambda t: float(t.num_calls))
    res.update(temperature=temperature, samples=samples, seed=seed)
    res["efficiency"] = tool_efficiency(res["score_mean"], res["calls_per_traj"])
    (out / "eval.json").write_text(json.dumps(res, indent=1))
    return res


def latest_weights(run_dir: Path) -> str:
    files = sorted((run_dir / "weights").glob("v*.safetensors"), key=lambda p: int(p.stem[1:]))
    if not files:
        raise FileNotFoundError(f"{run_dir}/weights has no v*.safetensors: the run published no weight files")
    return str(files[-1])


def final_policy(run_dir: Path, *, sft_path: str) -> tuple[str, str | None]:
    """(model_path, weights) of a finished run's final policy, for `eval_policy`.

    `weights.transport=file` runs: the SFT model plus the newest `weights/v{N}.safetensors`. Collective runs
    write no weight files: the newest complete checkpoint (the driver writes one at the last step when
    `trainer.checkpoint_interval` > 0) is exported once to `<run_dir>/final_model` (a HF model dir)."""
    from tepo_ray.trainer.checkpoint import export_model_dir, load_latest

    if any((run_dir / "weights").glob("v*.safetensors")):
        return sft_path, latest_weights(run_dir)
    latest = load_latest(run_dir / "checkpoints")
    if latest is None:
        raise FileNotFoundError(f"{run_dir}: no weight files and no complete checkpoint to evaluate; set "
                                f"trainer.checkpoint_interval > 0 (a checkpoint is written at the last step)")
    out = run_dir / "final_model"
    stamp = out / "exported_from.txt"
    if not (stamp.is_file() and stamp.read_text() == str(latest.path)):
        export_model_dir(latest.path, out)
        stamp.write_text(str(latest.path))
    return str(out), None


def _train_tail(run_dir: Path, keys: Sequence[str]) -> dict[str, float | None]:
    """Means of `keys` over the last quarter of the run's steps."""
    from tepo_ray.metrics import read_metrics

    recs = read_metrics(run_dir / "metrics.jsonl")
    tail = recs[-max(1, len(recs) // 4):]
    out: dict[str, float | None] = {}
    for k in keys:
        vals = [r[k] for r in tail if isinstance(r.get(k), (int, float))]
        out[k] = sum(vals) / len(vals) if vals else None
    return out


def _concurrency(cfg: DictConfig, cluster_cpus: float, cluster_gpus: float) -> int:
    from tepo_ray.topology import plan_topology

    plan = plan_topology(cfg)
    fit = int(cluster_cpus // max(plan.total_cpus, 1e-9))
    if plan.total_gpus > 0:
        fit = min(fit, int(cluster_gpus // plan.total_gpus))
    fit = max(fit, 1)
    return min(fit, cfg.sweep.max_concurrent) if cfg.sweep.max_concurrent else fit


def run_sweep(cfg: DictConfig, *, out_dir: str | Path, address: str | None = None,
              progress: bool = False) -> dict[str, Any]:
    """Train and evaluate every (arm, seed) from one SFT checkpoint; write the report (module docstring)."""
    import ray

    from tepo_ray.config import save_resolved, to_yaml
    from tepo_ray.prepare import prepare_data
    from tepo_ray.driver import QUIET_ENV

    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    save_resolved(cfg, out)
    t0 = time.perf_counter()
    data = prepare_data(cfg, progress=progress)
    sft_path = str(Path(data.model_path).resolve())
    group = cfg.logging.wandb_group or out.name
    arms = sweep_arms(cfg.sweep)
    jobs = [(arm, int(seed)) for seed in cfg.sweep.seeds for arm in arms]

    if not ray.is_initialized():
        extra = {} if address else {"_system_config": {"worker_niceness": 0}}
        ray.init(address=address or os.environ.get("RAY_ADDRESS") or None, include_dashboard=False,
                 log_to_driver=False, runtime_env={"env_vars": QUIET_ENV}, **extra)
    gcs = ray.get_runtime_context().gcs_address
    res = ray.cluster_resources()
    parallel = _concurrency(cfg, float(res.get("CPU", 0)), float(res.get("GPU", 0)))
    print(f"[sweep] {len(jobs)} runs ({', '.join(a.name for a in arms)} x seeds {list(cfg.sweep.seeds)}), "
          f"{parallel} at a time, from SFT checkpoint {sft_path}", flush=True)

    # One search index for every arm: a named search service on this cluster, not a pool (and index copy)
    # per run (`tools.search.service`); a user-given service is used as it is.
    from tepo_ray.topology import needs_search

    service_overrides: list[str] = []
    own_service = None
    if needs_search(cfg) and data.index_dir:
        from tepo_ray.tool_pools import start_service

        own_service = f"sweep-search-{out.name}"
        start_service(cfg, "search", name=own_service, index_dir=str(data.index_dir))
        service_overrides = [f"tools.search.service={own_service}"]
        print(f"[sweep] every arm searches through the shared service {own_service!r}", flush=True)

    def run_one(job: tuple[Arm, int]) -> dict[str, Any]:
        arm, seed = job
        run_dir = out / "runs" / f"{arm.name}-s{seed}"
        run_cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(arm.overrides() + [
            f"trainer.seed={seed}", f"engine.seed={seed}", f"model.path={sft_path}", f"logging.run_dir={run_dir}",
            f"logging.name={arm.name}-s{seed}", f"logging.wandb_group={group}", f"sweep.arm={arm.name}",
            "logging.progress=false", *service_overrides]
            # the final policy is evaluated from the checkpoint at the last step (collective runs write no
            # weight files): every run checkpoints at least at its end
            + ([f"trainer.checkpoint_interval={int(cfg.trainer.steps)}"] if not cfg.trainer.checkpoint_interval else [])))
        cfg_path = out / "configs" / f"{arm.name}-s{seed}.yaml"
        cfg_path.parent.mkdir(parents=True, exist_ok=True)
        cfg_path.write_text(to_yaml(run_cfg))
        log = out / "logs" / f"{arm.name}-s{seed}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        info = {"arm": arm.name, "mode": arm.mode, "alpha": arm.alpha, "seed": seed, "run_dir": str(run_dir),
                "config": str(cfg_path), "log": str(log)}
        if not (run_dir / "summary.json").exists():  # a finished run is reused (re-running the sweep resumes it)
            with open(log, "w") as fh:
                proc = subprocess.run([sys.executable, "-m", "tepo_ray.cli", "train", str(cfg_path), "--address", gcs],
                                      stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, **QUIET_ENV})
            if proc.returncode != 0 or not (run_dir / "summary.json").exists():
                # One failed run does not stop the others: it is reported with its log and left out of the table.
                info["error"] = f"training exited with status {proc.returncode}; see {log}"
                print(f"[sweep] {arm.name} seed {seed} FAILED (exit {proc.returncode}); see {log}", flush=True)
        if "error" not in info:
            print(f"[sweep] trained {arm.name} seed {seed} in {time.perf_counter() - t:.0f}s -> {run_dir}", flush=True)
        info["train_s"] = round(time.perf_counter() - t, 1)
        return info

    try:
        with ThreadPoolExecutor(max_workers=parallel) as pool:
            all_runs = list(pool.map(run_one, jobs))
    finally:
        if own_service:
            from tepo_ray.tool_pools import stop_service

            stop_service(own_service)
    failed = [r for r in all_runs if "error" in r]
    runs = [r for r in all_runs if "error" not in r]
    if not runs:
        raise RuntimeError(f"every sweep run failed; logs: {', '.join(r['log'] for r in failed)}")

    from tepo_ray.metrics import K

    ekw = dict(temperature=float(cfg.sweep.eval_temperature), samples=int(cfg.sweep.eval_samples), seed=0)
    sft_eval = eval_policy(cfg, model_path=sft_path, out_dir=out / "eval" / "sft", **ekw) if cfg.sweep.eval_sft else None
    for r in runs:
        run_dir = Path(r["run_dir"])
        final_model, final_weights = final_policy(run_dir, sft_path=sft_path)
        r["eval"] = eval_policy(cfg, model_path=final_model, weights=final_weights,
                                out_dir=out / "eval" / f"{r['arm']}-s{r['seed']}", **ekw)
        r["train_tail"] = _train_tail(run_dir, [K.DELTA_H_MEAN, K.M_OVER_N, K.CALLS, K.SCORE, K.REWARD])
        print(f"[sweep] eval {r['arm']} seed {r['seed']}: accuracy {r['eval']['accuracy']:.3f}, "
              f"calls/q {r['eval']['calls_per_traj']:.2f}", flush=True)
    summary = write_sweep_report(runs, sft_eval=sft_eval, out_dir=out,
                                 meta={"sft_path": sft_path, "wandb_project": cfg.logging.wandb_project,
                                       "wandb_group": group, "wandb_mode": cfg.logging.wandb_mode,
                                       "parallel": parallel, "steps": cfg.trainer.steps,
                                       "seeds": list(cfg.sweep.seeds), "eval_items": len(data.eval_items),
                                       "eval_temperature": float(cfg.sweep.eval_temperature),
                                       "eval_samples": int(cfg.sweep.eval_samples),
                                       "wall_s": round(time.perf_counter() - t0, 1),
                                       "failed_runs": [{k: r[k] for k in ("arm", "seed", "log")} for r in failed]})
    return summary


def _mean_std(vals: Sequence[float | None]) -> tuple[float | None, float | None]:
    v = [x for x in vals if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not v:
        return None, None
    return sum(v) / len(v), (statistics.stdev(v) if len(v) > 1 else 0.0)


def _ms(vals: Sequence[float | None], digits: int = 3) -> str:
    m, s = _mean_std(vals)
    return "–" if m is None else f"{m:.{digits}f} ± {s:.{digits}f}"


def write_sweep_report(runs: list[dict[str, Any]], *, sft_eval: dict[str, Any] | None, out_dir: str | Path,
                       meta: dict[str, Any]) -> dict[str, Any]:
    """report.md / report.json and the plots, from finished runs with their `eval` and `train_tail`."""
    from tepo_ray.metrics import K, plot_run

    out = Path(out_dir)
    arms: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        arms.setdefault(r["arm"], []).append(r)
    plots = {"all": str(plot_run({f"{r['arm']}-s{r['seed']}": r["run_dir"] for r in runs}, out / "curves_all.png"))}
    for name, rs in arms.items():
        plots[name] = str(plot_run({f"s{r['seed']}": r["run_dir"] for r in rs}, out / f"curves_{name}.png"))

    rows: dict[str, dict[str, Any]] = {}
    for name, rs in arms.items():
        ev = [r["eval"] for r in rs]
        row: dict[str, Any] = {
            "seeds": [r["seed"] for r in rs],
            "accuracy": _mean_std([e["accuracy"] for e in ev]),
            "score": _mean_std([e["score_mean"] for e in ev]),
            "calls_per_question": _mean_std([e["calls_per_traj"] for e in ev]),
            "efficiency": _mean_std([e["efficiency"] for e in ev]),
            "train_delta_h": _mean_std([r["train_tail"].get(K.DELTA_H_MEAN) for r in rs]),
            "train_m_over_n": _mean_std([r["train_tail"].get(K.M_OVER_N) for r in rs]),
        }
        if sft_eval is not None:  # arm vs SFT, items pooled over seeds (each seed's items paired with SFT's)
            a = [x for _ in rs for x in sft_eval["item_correct"]]
            b = [x for e in ev for x in e["item_correct"]]
            row["vs_sft_accuracy"] = paired_bootstrap(a, b)
        rows[name] = row

    def vs(name_a: str, name_b: str, key: str) -> dict[str, float] | None:
        """name_b − name_a on `key` per item, paired by seed (same held-out items)."""
        if name_a not in arms or name_b not in arms:
            return None
        by_seed_a = {r["seed"]: r["eval"][key] for r in arms[name_a]}
        pa, pb = [], []
        for r in arms[name_b]:
            if r["seed"] in by_seed_a:
                pa += by_seed_a[r["seed"]]
                pb += r["eval"][key]
        return paired_bootstrap(pa, pb) if pa else None

    contrasts = {"sparse_vs_grpo_calls": vs("grpo", "sparse", "item_calls"),
                 "sparse_vs_grpo_accuracy": vs("grpo", "sparse", "item_correct")}
    for name in arms:
        if name.startswith("dense"):
            contrasts[f"{name}_vs_grpo_accuracy"] = vs("grpo", name, "item_correct")
            contrasts[f"{name}_vs_grpo_calls"] = vs("grpo", name, "item_calls")

    result = {"meta": meta, "sft": {k: v for k, v in (sft_eval or {}).items() if not k.startswith("item_")},
              "arms": rows, "contrasts": contrasts, "plots": plots,
              "runs": [{k: v for k, v in r.items() if k != "eval"} | {"eval": {k: v for k, v in r["eval"].items()
                                                                                if not k.startswith("item_")}}
                       for r in runs]}
    (out / "report.json").write_text(json.dumps(result, indent=1, default=str))

    def f(pair: tuple[float | None, float | None], digits: int = 3) -> str:
        m, s = pair
        return "–" if m is None else f"{m:.{digits}f} ± {s:.{digits}f}"

    def ci(c: dict[str, float] | None, digits: int = 3) -> str:
        return "–" if not c else f"{c['diff']:+.{digits}f} [{c['ci_low']:+.{digits}f}, {c['ci_high']:+.{digits}f}]"

    lines = ["# GRPO vs TEPO-sparse vs TEPO-dense", "",
             f"{meta.get('eval_items')} held-out items, "
             + ("greedy decoding" if not meta.get("eval_temperature") else
                f"{meta.get('eval_samples')} samples per item at temperature {meta.get('eval_temperature'):g}")
             + f", real tools; seeds {meta.get('seeds')}; "
             f"{meta.get('steps')} RL steps per run from the SFT checkpoint `{meta.get('sft_path')}`; "
             f"{meta.get('parallel')} run(s) at a time; wall {meta.get('wall_s')} s.", "",
             "| arm | seeds | accuracy | F1 / score | calls per question | efficiency (score/call) | "
             "train ΔH (last ¼) | train m/n | accuracy − SFT [95% CI] |",
             "|---|---|---|---|---|---|---|---|---|"]
    if sft_eval is not None:
        lines.append(f"| SFT | – | {sft_eval['accuracy']:.3f} | {sft_eval['score_mean']:.3f} | "
                     f"{sft_eval['calls_per_traj']:.2f} | "
                     f"{'–' if sft_eval['efficiency'] is None else format(sft_eval['efficiency'], '.3f')} | – | – | – |")
    for name, row in rows.items():
        lines.append(f"| {name} | {len(row['seeds'])} | {f(row['accuracy'])} | {f(row['score'])} | "
                     f"{f(row['calls_per_question'], 2)} | {f(row['efficiency'])} | {f(row['train_delta_h'], 4)} | "
                     f"{f(row['train_m_over_n'], 2)} | {ci(row.get('vs_sft_accuracy'))} |")
    lines += ["", "Mean ± std over seeds. CIs: paired percentile bootstrap over held-out items (2000 resamples), "
              "items pooled over seeds (samples of one item averaged first).", "", "Contrasts (second arm − first, per item):", ""]
    for key, c in contrasts.items():
        if c:
            lines.append(f"* {key}: {ci(c)} (P(diff ≤ 0) = {c['p_le_0']:.3f}, n = {c['n']})")
    for fr in meta.get("failed_runs") or []:
        lines.append(f"* FAILED run (left out of the table): {fr['arm']} seed {fr['seed']}, log `{fr['log']}`")
    lines += ["", f"Curves: `{Path(plots['all']).name}` (all runs), "
              + ", ".join(f"`{Path(p).name}`" for k, p in plots.items() if k != "all") + ".",
              f"W&B ({meta.get('wandb_mode')}): project `{meta.get('wandb_project')}`, group "
              f"`{meta.get('wandb_group')}`, one run per arm and seed under `runs/<arm>-s<seed>/wandb/`."]
    (out / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    result["report"] = str(out / "report.md")
    return result
