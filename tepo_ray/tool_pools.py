"""Which tool pools a run has and how each is started: shared by the training driver and eval.

Contract: `start_tool_pools(cfg, index_dir=..., placement=...)` creates one
`actors.tool_pool_service.ToolPoolService` actor per enabled tool kind and
returns `{kind: handle}`. A kind is enabled when `tools.<kind>.workers > 0`
(search also needs an index dir). With a `PoolPlacement` (the driver), each
pool actor is pinned to its first bundle and its workers share the bundles'
CPUs so `max_workers` fit without a new placement group. Without one (a
stand-alone eval), each worker asks for `UNPLACED_CPUS_PER_WORKER` CPUs.
Pools are restartable (`max_restarts=-1`); callers shut down `owned_pools(cfg, pools)`.

Shared service: `tools.search.service=NAME` makes `start_tool_pools` connect to a
long-lived, detached, named `ToolPoolService` (`start_service`, the CLI's
`tepo-ray tools serve`) in namespace `SERVICE_NAMESPACE` instead of starting a
search pool, so several runs (the arms of a sweep) call one index; runs never
shut it down (`stop_service` does).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Sequence

from omegaconf import OmegaConf

__all__ = ["TOOL_KINDS", "QUIET_ENV", "PoolPlacement", "tools_cfg_for", "worker_resources", "enabled_tool_kinds",
           "start_tool_pools", "UNPLACED_CPUS_PER_WORKER", "SERVICE_NAMESPACE", "start_service", "connect_service",
           "stop_service", "owned_pools"]

SERVICE_NAMESPACE = "tepo-tools"

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


def _service_name(cfg: Any, kind: str) -> str | None:
    return getattr(cfg.tools[kind], "service", None) if kind == "search" else None


def enabled_tool_kinds(cfg: Any, *, index_dir: str | None) -> list[str]:
    return [kind for kind, _ in TOOL_KINDS
            if _service_name(cfg, kind) or (cfg.tools[kind].workers and (kind != "search" or index_dir))]


def start_service(cfg: Any, kind: str, *, name: str, index_dir: str | None) -> Any:
    """Start (or find, when it runs already) the detached named `ToolPoolService` `name`; returns its handle.
    It outlives the process that started it; `stop_service(name)` ends it."""
    import ray

    from actors.tool_pool_service import ToolPoolService

    if kind == "search" and not index_dir:
        raise ValueError("a search service needs an index: set tools.search.index_dir or data.corpus_path")
    res = SimpleNamespace(num_cpus=UNPLACED_CPUS_PER_WORKER, num_gpus=0.0)
    handle = ray.remote(ToolPoolService).options(
        name=name, namespace=SERVICE_NAMESPACE, lifetime="detached", get_if_exists=True, num_cpus=0,
        max_concurrency=10_000, max_restarts=-1).remote(kind, tools_cfg=tools_cfg_for(cfg, kind, index_dir),
                                                        resources=res)
    ray.get(handle.ready.remote())
    return handle


def connect_service(name: str) -> Any:
    """The handle of the running service `name`, or a ValueError saying how to start it."""
    import ray

    try:
        return ray.get_actor(name, namespace=SERVICE_NAMESPACE)
    except ValueError:
        raise ValueError(f"tools.search.service={name!r}: no such service in Ray namespace {SERVICE_NAMESPACE!r} "
                         f"of this cluster; start it first with `tepo-ray tools serve CONFIG --name {name}` "
                         f"(or set tools.search.service=null to start a pool per run)") from None


def stop_service(name: str) -> bool:
    """Shut down and kill the service `name`; False when none runs."""
    import ray

    try:
        handle = ray.get_actor(name, namespace=SERVICE_NAMESPACE)
    except ValueError:
        return False
    try:
        ray.get(handle.shutdown.remote(), timeout=30)
    finally:
        ray.kill(handle)
    return True


def owned_pools(cfg: Any, pools: dict[str, Any]) -> dict[str, Any]:
    """The pools a run started itself (and must shut down): all but shared services."""
    return {kind: h for kind, h in pools.items() if not _service_name(cfg, kind)}


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
        if _service_name(cfg, kind):
            pools[kind] = connect_service(_service_name(cfg, kind))
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
