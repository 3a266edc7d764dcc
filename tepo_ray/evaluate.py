"""Greedy evaluation on the held-out split, with the real tool pools on a (local) Ray cluster."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from tepo_ray.records import Trajectory, write_jsonl

__all__ = ["evaluate", "summarize_trajectories"]


def summarize_trajectories(trajs: list[Trajectory]) -> dict[str, Any]:
    n = max(len(trajs), 1)
    scores = [t.score or 0.0 for t in trajs]
    return {
        "n": len(trajs),
        "score_mean": sum(scores) / n,
        "accuracy": sum(1 for s in scores if s >= 1.0) / n,
        "answered": sum(1 for t in trajs if t.answer is not None) / n,
        "calls_per_traj": sum(t.num_calls for t in trajs) / n,
        "tool_errors": sum(1 for t in trajs for c in t.tool_calls if c.error) / n,
    }


def evaluate(cfg: DictConfig, *, model_path: str | None = None, address: str | None = None,
             out_dir: str | Path | None = None, weights: str | None = None, temperature: float = 0.0,
             samples: int = 1, seed: int | None = None) -> dict[str, Any]:
    """Eval of `model_path` (default: the SFT checkpoint), greedy unless `temperature` > 0 (then `samples`
    per item, engine seed `seed`); `weights`: a trained run's `weights/v{N}.safetensors` loaded over it."""
    import ray

    from actors.generation import GenerationWorker
    from actors.tool_pool_service import ToolPoolService
    from tepo_ray.driver import _tools_cfg, _worker_resources
    from tepo_ray.topology import Bundle
    from tepo_ray.algo import outcome_scores
    from tepo_ray.data.world import prepare_data

    data = prepare_data(cfg, progress=cfg.logging.progress)
    model_path = model_path or data.model_path
    items = data.eval_items
    if not items:
        raise ValueError("data.num_eval is 0: nothing to evaluate")
    if not ray.is_initialized():
        from tepo_ray.driver import QUIET_ENV

        ray.init(address=address or os.environ.get("RAY_ADDRESS") or None, include_dashboard=False,
                 runtime_env={"env_vars": QUIET_ENV})
    pools = {}
    for kind in ("python", "search"):
        if cfg.tools[kind].workers and (kind == "python" or data.index_dir):
            res = _worker_resources([Bundle(kind, 0, 0, 0.25 * cfg.tools[kind].max_workers, 0.0)],
                                    cfg.tools[kind].max_workers)
            pools[kind] = ray.remote(ToolPoolService).options(num_cpus=0, max_concurrency=10_000).remote(
                kind, tools_cfg=_tools_cfg(cfg, kind, data.index_dir), resources=res)
    engine_cfg = OmegaConf.merge(cfg.engine, {"temperature": float(temperature)},
                                 {"seed": int(seed)} if seed is not None else {})
    gen = ray.remote(GenerationWorker).options(num_cpus=0.5, max_concurrency=10_000).remote(
        engine_cfg=engine_cfg, model_path=model_path, pools=pools,
        max_observation_chars=cfg.tools.max_observation_chars, name="eval")
    try:
        if weights:
            ray.get(gen.set_weights.remote(str(weights), 1))  # applied before the first engine call
        groups = ray.get(gen.generate_groups.remote(items, group_ids=[f"eval-{it['id']}" for it in items],
                                                    group_size=samples))
        trajs = [Trajectory.from_dict(d) for g in groups for d in g]
        scores = outcome_scores([t.answer for t in trajs], [t.gold for t in trajs],
                                task_types=[t.task_type for t in trajs])
        for t, s in zip(trajs, scores.tolist()):
            t.score = float(s)
        result = summarize_trajectories(trajs)
        result["model_path"] = str(model_path)
        result["weights"] = str(weights) if weights else None
        if out_dir is not None:
            out = Path(out_dir)
            out.mkdir(parents=True, exist_ok=True)
            write_jsonl(out / "eval_trajectories.jsonl", trajs)
            (out / "eval.json").write_text(json.dumps(result, indent=2))
        return result
    finally:
        try:
            ray.get(gen.shutdown.remote(), timeout=30)
        except Exception:
            pass
