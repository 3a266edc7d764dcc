"""Greedy evaluation with the real tools: answer quality, tool use and ΔH per data set.

`evaluate(cfg, datasets={name: path})` (what `tepo-ray eval CONFIG --model DIR
--data NAME=PATH ...` runs) loads each file with the loader registered as NAME
(`tepo_ray.data.loaders`; no `--data` = the config's held-out split), samples
one greedy trajectory per question with a `GenerationWorker` whose tool calls go
to the real tool pools (`tepo_ray.tool_pools`), scores entropies with an
`EntropyScorer` (the same ΔH as training, `algo.entropy_span`), and reports per
data set (`tepo_ray.metrics.EVAL_METRICS`):

* `em`, `f1` — SQuAD-normalised exact match and token F1 (QA items; None for math-only sets);
* `accuracy` — share answered correctly: EM = 1 for QA, math-verify equivalence for math;
* `calls_per_question`, `correct_per_call` (correct answers per tool call, None without calls),
  `malformed_per_question`, `tool_errors_per_question`, `answered`;
* `delta_h_mean` and `delta_h_negative_share` over calls with a defined ΔH
  (`tepo_ray.metrics.call_stats`, the definition training logs).

The report is written as `eval.json` and `eval.md` (plus the trajectories) when
`out_dir` is given. `Evaluator` is the reusable part: the training driver holds
one and runs it on the held-out split every `trainer.eval_interval` steps.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from omegaconf import DictConfig, OmegaConf

from tepo_ray.metrics import EVAL_METRICS, K, call_stats
from tepo_ray.records import Trajectory, write_jsonl

__all__ = ["evaluate", "Evaluator", "score_trajectories", "summarize_trajectories", "write_report",
           "parse_data_args", "eval_record"]


def parse_data_args(args: Sequence[str]) -> dict[str, tuple[str, str]]:
    """`NAME=PATH` (NAME a loader name, optionally `NAME:LABEL=PATH` to evaluate two files of one format)
    -> {label: (loader name, path)}."""
    out: dict[str, tuple[str, str]] = {}
    for arg in args:
        if "=" not in arg:
            raise ValueError(f"--data {arg!r}: expected NAME=PATH, e.g. hotpotqa=hotpot_dev_distractor_v1.json")
        name, path = arg.split("=", 1)
        loader, _, label = name.partition(":")
        label = label or loader
        if label in out:
            raise ValueError(f"--data {arg!r}: {label!r} given twice; name one NAME:LABEL=PATH")
        out[label] = (loader, path)
    return out


def score_trajectories(trajs: Sequence[Trajectory]) -> None:
    """Set `score` (the training score of the item's task type), `meta["em"]`, `meta["f1"]` (QA) and
    `meta["correct"]` (EM = 1 for QA, equivalence for math)."""
    from tepo_ray.algo import exact_match, f1_score, outcome_scores

    if not trajs:
        return
    scores = outcome_scores([t.answer for t in trajs], [t.gold for t in trajs],
                            task_types=[t.task_type for t in trajs])
    for t, s in zip(trajs, scores.tolist()):
        t.score = float(s)
        if t.task_type == "math":
            t.meta["correct"] = t.score >= 1.0
        else:
            t.meta["em"] = exact_match(t.answer, t.gold)
            t.meta["f1"] = f1_score(t.answer, t.gold)
            t.meta["correct"] = t.meta["em"] >= 1.0


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def summarize_trajectories(trajs: Sequence[Trajectory], *, malformed_calls: str = "exclude") -> dict[str, Any]:
    """The EVAL_METRICS of one data set's scored trajectories (see the module docstring)."""
    n = len(trajs)
    qa = [t for t in trajs if t.task_type != "math"]
    correct = sum(1 for t in trajs if t.meta.get("correct"))
    cs = call_stats(trajs, malformed_calls=malformed_calls)
    calls = sum(t.num_calls for t in trajs)
    out = {
        "n": n,
        "em": _mean([float(t.meta.get("em", 0.0)) for t in qa]),
        "f1": _mean([float(t.meta.get("f1", 0.0)) for t in qa]),
        "accuracy": correct / n if n else None,
        "answered": sum(1 for t in trajs if t.answer is not None) / n if n else None,
        "calls_per_question": calls / n if n else None,
        "correct_per_call": correct / calls if calls else None,
        "delta_h_mean": cs["delta_h_mean"],
        "delta_h_negative_share": cs["decrease_fraction"],
        "malformed_per_question": cs["malformed_per_traj"] if n else None,
        "tool_errors_per_question": sum(1 for t in trajs for c in t.tool_calls if c.error) / n if n else None,
    }
    assert tuple(out) == EVAL_METRICS
    return out


def eval_record(results: Mapping[str, Mapping[str, Any]], *, step: int) -> dict[str, Any]:
    """One metrics.jsonl / W&B record: `eval/<data set>/<metric>` for every data set."""
    rec: dict[str, Any] = {K.STEP: step}
    for name, summary in results.items():
        for metric in EVAL_METRICS:
            rec[K.EVAL.format(name=name, metric=metric)] = summary.get(metric)
    return rec


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def write_report(report: Mapping[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """`eval.json` (everything) and `eval.md` (one table row per data set)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "eval.json"
    json_path.write_text(json.dumps(report, indent=2))
    cols = list(EVAL_METRICS)
    lines = [f"# Evaluation of `{report.get('model_path')}`", "",
             "| data set | " + " | ".join(cols) + " | skipped |", "|---" * (len(cols) + 2) + "|"]
    for name, summary in report["datasets"].items():
        skipped = ", ".join(f"{k}: {v}" for k, v in (summary.get("skipped") or {}).items()) or "–"
        lines.append(f"| {name} | " + " | ".join(_fmt(summary.get(c)) for c in cols) + f" | {skipped} |")
    lines += ["", "em/f1: QA items; accuracy: EM = 1 (QA) or math-verify equivalence (math); "
              "correct_per_call: correct answers per tool call; ΔH over calls with a defined ΔH."]
    md_path = out / "eval.md"
    md_path.write_text("\n".join(lines) + "\n")
    return json_path, md_path


class Evaluator:
    """Greedy generation + entropy scoring of whole data sets on existing actors (plain class).

    `generator`: a GenerationWorker actor sampling at temperature 0 with the tool pools;
    `scorer`: an EntropyScorer actor. `run` sends `weights` (path, version) to both first.
    """

    def __init__(self, *, generator: Any, scorer: Any, malformed_calls: str = "exclude") -> None:
        self.generator = generator
        self.scorer = scorer
        self.malformed_calls = malformed_calls

    def run(self, datasets: Mapping[str, Sequence[dict[str, Any]]], *, weights: tuple[str, int] | None = None,
            group_size: int = 1) -> tuple[dict[str, dict[str, Any]], dict[str, list[Trajectory]]]:
        """`group_size`: trajectories per item (> 1 with a sampling generator)."""
        import ray

        if weights is not None and weights[1] > 0:
            ray.get(self.generator.set_weights.remote(weights[0], weights[1]))
        results: dict[str, dict[str, Any]] = {}
        all_trajs: dict[str, list[Trajectory]] = {}
        for name, items in datasets.items():
            groups = ray.get(self.generator.generate_groups.remote(
                list(items), group_ids=[f"eval-{name}-{i}" for i in range(len(items))], group_size=group_size))
            trajs = [Trajectory.from_dict(d) for g in groups for d in g]
            by_version: dict[int, list[Trajectory]] = {}
            for t in trajs:
                by_version.setdefault(t.behaviour_version, []).append(t)
            scored: list[Trajectory] = []
            for version, ts in by_version.items():
                known = weights is not None and version == weights[1] and version > 0
                scored += [Trajectory.from_dict(d) for d in ray.get(self.scorer.score.remote(
                    [t.to_dict() for t in ts], weights_path=weights[0] if known else None,
                    version=version if known else None))]
            order = {t.uid: i for i, t in enumerate(trajs)}
            scored.sort(key=lambda t: order[t.uid])
            score_trajectories(scored)
            results[name] = summarize_trajectories(scored, malformed_calls=self.malformed_calls)
            all_trajs[name] = scored
        return results, all_trajs


def _load_sets(cfg: DictConfig, data_args: Mapping[str, tuple[str, str]], limit: int | None,
               ) -> tuple[dict[str, list[dict[str, Any]]], dict[str, dict[str, int]]]:
    from tepo_ray.data.loaders import load_dataset

    sets, skipped = {}, {}
    fields = OmegaConf.to_container(cfg.data.jsonl_fields)
    for label, (loader, path) in data_args.items():
        res = load_dataset(loader, path, fields=fields)  # whole file read (and checked) before any generation
        sets[label] = res.items[:limit] if limit else res.items
        skipped[label] = dict(res.skipped)
    return sets, skipped


def evaluate(cfg: DictConfig, *, model_path: str | None = None, datasets: Sequence[str] | None = None,
             limit: int | None = None, address: str | None = None, out_dir: str | Path | None = None,
             weights: str | None = None, temperature: float = 0.0, samples: int = 1, seed: int | None = None,
             ) -> dict[str, Any]:
    """Evaluate `model_path` (default: the config's model after SFT) on `datasets` (`NAME=PATH` strings;
    default: the held-out split); returns the report (also written under `out_dir`). Greedy unless
    `temperature` > 0 (then `samples` per item, engine seed `seed`); `weights`: a run's
    `weights/v{N}.safetensors` loaded over `model_path`."""
    import ray

    from actors.entropy_scorer import EntropyScorerActor
    from actors.generation import GenerationWorker
    from tepo_ray.prepare import prepare_data
    from tepo_ray.tool_pools import QUIET_ENV, owned_pools, start_tool_pools

    data_args = parse_data_args(datasets or [])
    sets, skipped = _load_sets(cfg, data_args, limit)  # bad files fail before anything starts
    data = prepare_data(cfg, progress=cfg.logging.progress)
    model_path = model_path or data.model_path
    if not sets:
        if not data.eval_items:
            raise ValueError("data.num_eval is 0 and no --data given: nothing to evaluate")
        sets = {"held_out": data.eval_items[:limit] if limit else data.eval_items}
    if not ray.is_initialized():
        ray.init(address=address or os.environ.get("RAY_ADDRESS") or None, include_dashboard=False,
                 runtime_env={"env_vars": QUIET_ENV})
    pools = start_tool_pools(cfg, index_dir=data.index_dir)
    engine_cfg = OmegaConf.merge(cfg.engine, {"temperature": float(temperature)},
                                 {"seed": int(seed)} if seed is not None else {})
    gen = ray.remote(GenerationWorker).options(num_cpus=0.5, max_concurrency=10_000).remote(
        engine_cfg=engine_cfg, model_path=model_path, pools=pools,
        max_observation_chars=cfg.tools.max_observation_chars, name="eval", prompt_cfg=cfg.prompt)
    scorer = EntropyScorerActor.options(num_cpus=0.25).remote(model_path, algo_cfg=cfg.algo, name="eval-scorer")
    try:
        results, trajs = Evaluator(generator=gen, scorer=scorer, malformed_calls=cfg.algo.malformed_calls).run(
            sets, weights=(str(weights), 1) if weights else None, group_size=samples)
        for name in results:
            results[name]["skipped"] = skipped.get(name, {})
        report: dict[str, Any] = {"model_path": str(model_path), "weights": str(weights) if weights else None,
                                  "temperature": float(temperature), "samples": int(samples), "datasets": results}
        if out_dir is not None:
            out = Path(out_dir)
            out.mkdir(parents=True, exist_ok=True)
            for name, ts in trajs.items():
                path = out / f"eval_trajectories_{name}.jsonl"
                path.unlink(missing_ok=True)
                write_jsonl(path, ts)
            json_path, md_path = write_report(report, out)
            report["report_json"], report["report_md"] = str(json_path), str(md_path)
        return report
    finally:
        for actor in (gen, *owned_pools(cfg, pools).values()):
            try:
                ray.get(actor.shutdown.remote(), timeout=30)
            except Exception:
                pass
        for actor in (gen, scorer, *owned_pools(cfg, pools).values()):
            ray.kill(actor)
