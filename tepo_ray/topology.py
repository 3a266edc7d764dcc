"""Placement-group plan from the `topology` config (pure; no Ray needed to print it).

One placement group holds a bundle per replica of each role, in a fixed order:
generators, scorers, learner, python tool pool, search tool pool. Tool-pool
bundles are shared by that pool's workers (`tools.<kind>.max_workers` workers
split the bundle's CPUs), so `pool.scale(n)` at run time never needs a new
placement group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rich.table import Table

__all__ = ["ROLES", "Bundle", "TopologyPlan", "plan_topology"]

ROLES = ("generators", "scorers", "learner", "python_tools", "search_tools")


@dataclass(frozen=True)
class Bundle:
    role: str
    replica: int
    index: int  # bundle index inside the placement group
    num_cpus: float
    num_gpus: float

    def resources(self) -> dict[str, float]:
        res = {"CPU": self.num_cpus}
        if self.num_gpus > 0:
            res["GPU"] = self.num_gpus
        return res


@dataclass(frozen=True)
class TopologyPlan:
    strategy: str
    bundles: tuple[Bundle, ...]

    def for_role(self, role: str) -> list[Bundle]:
        return [b for b in self.bundles if b.role == role]

    @property
    def total_cpus(self) -> float:
        return sum(b.num_cpus for b in self.bundles)

    @property
    def total_gpus(self) -> float:
        return sum(b.num_gpus for b in self.bundles)

    def bundle_specs(self) -> list[dict[str, float]]:
        return [b.resources() for b in self.bundles]

    def table(self, *, title: str = "placement group") -> Table:
        t = Table(title=f"{title} (strategy {self.strategy})")
        for col in ("bundle", "role", "replica", "CPU", "GPU"):
            t.add_column(col)
        for b in self.bundles:
            t.add_row(str(b.index), b.role, str(b.replica), f"{b.num_cpus:g}", f"{b.num_gpus:g}")
        t.add_row("total", "", "", f"{self.total_cpus:g}", f"{self.total_gpus:g}")
        return t


def needs_search(cfg: Any) -> bool:
    """Whether a run starts a search pool: tasks that need it, or a user corpus to search."""
    if cfg.tools.search.workers == 0:
        return False
    return cfg.data.task in ("multihop", "mixed") or bool(cfg.data.corpus_path)


def plan_topology(cfg: Any) -> TopologyPlan:
    """Bundles for every role of `cfg.topology`; tool pools get a bundle only when they have workers."""
    topo = cfg.topology
    bundles: list[Bundle] = []
    for role in ROLES:
        r = topo[role]
        replicas = int(r.replicas)
        if role == "python_tools" and cfg.tools.python.workers == 0:
            replicas = 0
        if role == "search_tools" and not needs_search(cfg):
            replicas = 0  # no search pool is started: reserve nothing for it
        for i in range(replicas):
            bundles.append(Bundle(role, i, len(bundles), float(r.num_cpus), float(r.num_gpus)))
    for role in ("generators", "learner"):
        if not any(b.role == role for b in bundles):
            from tepo_ray.config import ConfigError

            raise ConfigError(f"topology.{role}.replicas must be >= 1 to train")
    strategy = topo.strategy.value if hasattr(topo.strategy, "value") else str(topo.strategy)
    return TopologyPlan(strategy=strategy, bundles=tuple(bundles))
