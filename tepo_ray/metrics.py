"""Metric keys (one place) and the metrics logger shared by the driver.

Every step writes one JSON line to `<run_dir>/metrics.jsonl` and logs the same
dict to W&B (offline by default; `wandb sync <run_dir>/wandb/offline-run-*`).
`plot_run` turns a metrics file into PNG plots (learning curves, ΔH histogram).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

__all__ = ["K", "MetricsLogger", "read_metrics", "plot_run", "summarize", "call_stats", "TOOLS"]

TOOLS = ("python", "search")


class K:
    """Metric keys."""

    STEP = "step"
    VERSION = "policy_version"
    REWARD = "reward/mean"
    REWARD_STD = "reward/std"
    SCORE = "score/mean"  # F1 / equivalence
    ACCURACY = "score/accuracy"  # fraction with score == 1
    CALLS = "tools/calls_per_traj"
    CALLS_BY_TOOL = "tools/{tool}/calls_per_traj"
    M_OVER_N = "tepo/m_over_n"
    DELTA_H_MEAN = "tepo/delta_h_mean"
    DELTA_H_TOOL = "tepo/{tool}/delta_h_mean"
    DELTA_H_TOOL_VALUES = "tepo/{tool}/delta_h_values"
    DECREASE_FRAC = "tepo/decrease_fraction"
    MALFORMED = "tools/malformed_per_traj"  # malformed calls (tool "invalid", empty, unknown tool) per trajectory
    MALFORMED_FRAC = "tools/malformed_fraction"  # malformed / all calls
    DELTA_H_VALUES = "tepo/delta_h_values"  # list: distribution, kept in jsonl for plots
    STALENESS_MIN = "async/staleness_min"
    STALENESS_MEAN = "async/staleness_mean"
    STALENESS_MAX = "async/staleness_max"
    DROPPED_STALE = "async/dropped_stale_total"
    ADMITTED = "async/groups_admitted_total"
    INFLIGHT = "async/groups_inflight"
    ITEMS = "data/item_indices"  # list: which prompts this step trained on (resume / no-duplicate checks)
    GEN_TOKENS_PER_S = "perf/gen_tokens_per_s"
    TRAIN_TOKENS_PER_S = "perf/train_tokens_per_s"
    TIME_STEP = "time/step_s"
    TIME_GEN = "time/{actor}/generate_s"
    TIME_SCORE = "time/{actor}/score_s"
    TIME_TRAIN = "time/learner/train_s"
    IDLE = "time/{actor}/idle_frac"
    FINISH = "rollout/finish_{reason}"
    RESPONSE_LEN = "rollout/response_tokens"
    RESTARTS = "faults/actor_restarts_total"
    RETRIED_GROUPS = "faults/groups_retried_total"
    FAILED_GROUPS = "faults/groups_skipped_total"  # prompts skipped after MAX_GROUP_ATTEMPTS failures
    WALL = "time/wall_s"
    # Evaluation (`tepo-ray eval`, and every trainer.eval_interval steps on the held-out split)
    EVAL_PREFIX = "eval/"
    EVAL = "eval/{name}/{metric}"  # metric: one of EVAL_METRICS
    TIME_EVAL = "time/eval_s"
    EVAL_FAILED = "eval/failed"  # 1 at a step whose periodic eval raised (training went on)

    # Sample accounting (trajectories), checked by tests/reliability: at every record
    # generated = trained + dropped_stale + failed + in_flight.
    SAMPLES_GENERATED = "samples/generated_total"
    SAMPLES_TRAINED = "samples/trained_total"
    SAMPLES_DROPPED_STALE = "samples/dropped_stale_total"
    SAMPLES_FAILED = "samples/failed_total"  # generated, then discarded: scoring failed, learner rewound
    SAMPLES_IN_FLIGHT = "samples/in_flight"  # generated, not yet trained/dropped (scoring, buffer)
    LEARNER_RESTARTS = "faults/learner_restarts_total"
    CHECKPOINT_FAILURES = "faults/checkpoint_failures_total"
    WEIGHT_LOAD_FAILURES = "faults/weight_load_failures"  # summed over generators (since their start)
    STATS_TIMEOUTS = "faults/stats_timeouts_total"


# Per-data-set evaluation metrics (`tepo_ray.evaluate.summarize_trajectories`).
EVAL_METRICS = ("n", "em", "f1", "accuracy", "answered", "calls_per_question", "correct_per_call",
                "delta_h_mean", "delta_h_negative_share", "malformed_per_question", "tool_errors_per_question")


def call_stats(trajectories: Iterable[Any], *, malformed_calls: str = "exclude") -> dict[str, Any]:
    """Tool-call statistics of a batch, the one definition the driver, learner and eval share.

    * ``calls_per_traj``: every call, malformed ones included; ``calls_by_tool`` per tool kind.
    * ``malformed_per_traj`` / ``malformed_fraction``: malformed calls (`ToolCall.malformed`).
    * ``m_over_n``: mean over trajectories with n > 0 of m / n, m = calls with ΔH < 0, n = calls that
      count under ``malformed_calls`` (exclude: well-formed only; penalize: all); None when no
      trajectory has n > 0.
    * ``delta_h_mean`` / ``delta_h_values``: over calls with a defined ΔH (malformed calls have none);
      ``delta_h_by_tool``; ``decrease_fraction``: share of those with ΔH < 0. None when empty.
    """
    trajs = list(trajectories)
    n_traj = max(len(trajs), 1)
    calls = [c for t in trajs for c in t.tool_calls]
    ratios = []
    for t in trajs:
        counted = [c for c in t.tool_calls if malformed_calls == "penalize" or not c.malformed]
        if counted:
            ratios.append(sum(1 for c in counted if c.entropy_decreased and not c.malformed) / len(counted))
    dh = [c.delta_entropy for c in calls if c.delta_entropy is not None]
    malformed = sum(1 for c in calls if c.malformed)
    by_tool = {tool: [c.delta_entropy for c in calls if c.tool == tool and c.delta_entropy is not None]
               for tool in TOOLS}
    return {
        "calls_per_traj": len(calls) / n_traj,
        "calls_by_tool": {tool: sum(1 for c in calls if c.tool == tool) / n_traj for tool in TOOLS},
        "malformed_per_traj": malformed / n_traj,
        "malformed_fraction": malformed / len(calls) if calls else 0.0,
        "m_over_n": sum(ratios) / len(ratios) if ratios else None,
        "delta_h_values": dh,
        "delta_h_mean": sum(dh) / len(dh) if dh else None,
        "delta_h_by_tool": {tool: (sum(v) / len(v) if v else None) for tool, v in by_tool.items()},
        "delta_h_values_by_tool": by_tool,
        "decrease_fraction": sum(1 for x in dh if x < 0) / len(dh) if dh else None,
    }


class MetricsLogger:
    """JSONL + W&B logger. Lists in a record stay in the JSONL but are sent to W&B as histograms."""

    def __init__(self, run_dir: str | Path, *, wandb_mode: str = "offline", project: str = "tepo-ray",
                 group: str | None = None, name: str | None = None, config: Mapping[str, Any] | None = None,
                 resume: bool = False):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        self._fh = open(self.path, "a", encoding="utf-8")
        self._t0 = time.time()
        self.wandb_run = None
        self.wandb_dir: Path | None = None
        if wandb_mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb_run = wandb.init(
                project=project, group=group, name=name, mode=wandb_mode, dir=str(self.run_dir),
                config=dict(config or {}), resume="allow" if resume else None,
                id=_wandb_id(self.run_dir) if resume else None, reinit="finish_previous",
                settings=wandb.Settings(console="off", x_disable_stats=True) if _has_settings() else None,
            )
            self.wandb_dir = Path(self.wandb_run.dir).parent
            (self.run_dir / "wandb_id").write_text(self.wandb_run.id)

    def log(self, record: Mapping[str, Any]) -> None:
        rec = {k: _jsonable(v) for k, v in record.items()}
        rec.setdefault(K.WALL, round(time.time() - self._t0, 3))
        self._fh.write(json.dumps(rec) + "\n")
        self._fh.flush()
        if self.wandb_run is not None:
            import wandb

            payload = {}
            for k, v in rec.items():
                if isinstance(v, list):
                    if v:
                        payload[k] = wandb.Histogram(v)
                elif v is not None:
                    payload[k] = v
            self.wandb_run.log(payload, step=int(rec.get(K.STEP, 0)))

    def rewind(self, *, keep_through_step: int) -> None:
        """Drop JSONL records after `keep_through_step` (the learner went back to a checkpoint)."""
        self._fh.close()
        kept = [ln for ln in self.path.read_text(encoding="utf-8").splitlines(keepends=True)
                if _step_of(ln) is not None and _step_of(ln) <= keep_through_step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        tmp.replace(self.path)
        self._fh = open(self.path, "a", encoding="utf-8")

    def close(self) -> None:
        self._fh.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def _step_of(line: str) -> int | None:
    try:
        return int(json.loads(line).get(K.STEP, 0))
    except (ValueError, json.JSONDecodeError, AttributeError):
        return None  # a torn line from a killed run


def _has_settings() -> bool:
    try:
        import wandb

        wandb.Settings(console="off", x_disable_stats=True)
        return True
    except Exception:
        return False


def _wandb_id(run_dir: Path) -> str | None:
    p = run_dir / "wandb_id"
    return p.read_text().strip() if p.exists() else None


def _jsonable(v: Any) -> Any:
    if hasattr(v, "item") and callable(v.item):
        try:
            v = v.item()
        except (ValueError, RuntimeError):
            v = v.tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    out = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                out.append(json.loads(line))
    return out


def summarize(records: Iterable[Mapping[str, Any]], keys: Iterable[str]) -> dict[str, float]:
    recs = list(records)
    out = {}
    for k in keys:
        vals = [r[k] for r in recs if isinstance(r.get(k), (int, float))]
        if vals:
            out[k] = sum(vals) / len(vals)
    return out


def plot_run(run_dirs: Mapping[str, str | Path], out_path: str | Path) -> Path:
    """Learning curves (reward, score, calls/traj, m/n) and the ΔH distribution, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(K.REWARD, "reward"), (K.SCORE, "score (F1 / acc)"), (K.CALLS, "tool calls / trajectory"),
              (K.M_OVER_N, "m / n (ΔH<0 share)"), (K.STALENESS_MAX, "max staleness")]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    axes = axes.ravel()
    for label, run_dir in run_dirs.items():
        recs = read_metrics(Path(run_dir) / "metrics.jsonl")
        steps = [r.get(K.STEP, i) for i, r in enumerate(recs)]
        for ax, (key, title) in zip(axes, panels):
            ys = [r.get(key) for r in recs]
            pts = [(s, y) for s, y in zip(steps, ys) if isinstance(y, (int, float))]
            if pts:
                ax.plot(*zip(*pts), label=label, marker=".")
            ax.set_title(title)
            ax.set_xlabel("step")
        dh = [x for r in recs for x in (r.get(K.DELTA_H_VALUES) or []) if isinstance(x, (int, float))]
        if dh:
            axes[5].hist(dh, bins=40, alpha=0.5, label=label)
    axes[5].set_title("ΔH per tool call (all steps)")
    axes[5].axvline(0.0, color="k", lw=0.8)
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    out_path = Path(out_path)
    fig.savefig(out_path, dpi=90)
    plt.close(fig)
    return out_path
