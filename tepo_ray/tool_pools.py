"""Which tool pools a run has and how each is started: shared by the training driver and eval.

Contract: `start_tool_pools(cfg, index_dir=..., placement=...)` creates one
`actors.tool_pool_service.ToolPoolService` actor per enabled tool kind and
returns `{kind: handle}`. A kind is enabled when `tools.<kind>.workers > 0`
(search also needs an index dir). With a `PoolPlacement` (the driver), each
pool actor is pinned to its first bundle and its workers share the bundles'
CPUs so `max_workers` fit without a new placement group. Without one (a
stand-alone eval), each worker asks for `UNPLACED_CPUS_PER_WORKER` CPUs.
Pools are restartable (`max_restarts=-1`); callers shut them down.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Sequence

from omegaconf import OmegaConf

__all__ = ["TOOL_KINDS", "QUIET_ENV", "PoolPlacement", "tools_cfg_for", "worker_resources", "enabled_tool_kinds",
           "start_tool_pools", "UNPLACED_CPUS_PER_WORKER"]

TOOL_KINDS: tuple[tuple[str, str], ...] = (("python", "python_tools"), ("search", "search_tools"))  # (kind, role)
UNPLACED_CPUS_PER_WORKER = 0.25

# Keep actor logs readable: engines and loaders are chatty at INFO.
QUIET_ENV = {"VLLM_LOGGING_LEVEL": "ERROR", "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
             "TOKENIZERS_PARALLELISM": "false", "RAY_DEDUP_LOGS": "1"}


@dataclass
class PoolPlacement:
    """Where the driver's pools live: its placement group and each role's bundles (`TopologyPlan.for_role`)."""

    placement_group: Any
    bundles_for_role: Any  # callable: role -> list of bundles with .index and .num_cpus


def worker_resources(bundles: Sequence[Any], max_workers: int) -> Any:
    """Per-worker CPUs so that `max_workers` workers fit the pool's bundles (scale() never needs a new PG)."""
    total_cpus = sum(b.num_cpus for b in bundles)
    return SimpleNamespace(num_cpus=total_cpus / max(max_workers, 1), num_gpus=0.0)


def tools_cfg_for(cfg: Any, kind: str, index_dir: str | None) -> Any:
    """The tools sub-config with the prepared index dir filled in."""
    tools = OmegaConf.to_object(cfg.tools)
    if kind == "search" and index_dir:
        tools.search.index_dir = index_dir
    return tools


def enabled_tool_kinds(cfg: Any, *, index_dir: str | None) -> list[str]:
    return [kind for kind, _ in TOOL_KINDS if cfg.tools[kind].workers and (kind != "search" or index_dir)]


def start_tool_pools(cfg: Any, *, index_dir: str | None, placement: PoolPlacement | None = None) -> dict[str, Any]:
    """Start the enabled pools (see the module docstring); returns {kind: ToolPoolService handle}."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from actors.tool_pool_service import ToolPoolService

    pool_cls = ray.remote(ToolPoolService)
    pools: dict[str, Any] = {}
    for kind, role in TOOL_KINDS:
        if kind not in enabled_tool_kinds(cfg, index_dir=index_dir):
            continue
        max_workers = cfg.tools[kind].max_workers
        tools_cfg = tools_cfg_for(cfg, kind, index_dir)
        if placement is None:
            res = SimpleNamespace(num_cpus=UNPLACED_CPUS_PER_WORKER, num_gpus=0.0)
            pools[kind] = pool_cls.options(num_cpus=0, max_concurrency=10_000, max_restarts=-1).remote(
                kind, tools_cfg=tools_cfg, resources=res)
            continue
        bundles = placement.bundles_for_role(role)
        if not bundles:
            continue
        strategy = PlacementGroupSchedulingStrategy(placement_group=placement.placement_group,
                                                    placement_group_bundle_index=bundles[0].index)
        pools[kind] = pool_cls.options(num_cpus=0, max_concurrency=10_000, max_restarts=-1,
                                       scheduling_strategy=strategy).remote(
            kind, tools_cfg=tools_cfg, resources=worker_resources(bundles, max_workers),
            placement_group=placement.placement_group, bundle_indices=[b.index for b in bundles])
    return pools
