"""Placement-group plan from the `topology` config (pure; no Ray needed to print it).

One placement group holds a bundle per replica of each role, in a fixed order:
generators, scorers, learner, python tool pool, search tool pool. Tool-pool
bundles are shared by that pool's workers (`tools.<kind>.max_workers` workers
split the bundle's CPUs), so `pool.scale(n)` at run time never needs a new
placement group.

A generator with `engine.tensor_parallel_size` = TP > 1 gets 1 + TP bundles: one
for the actor itself (its CPUs, no GPU) and TP bundles of exactly one GPU
(role `generator_gpus`, same replica), the layout vLLM's Ray executor expects
(it refuses bundles with more than one GPU and puts one worker per GPU bundle
named in `VLLM_RAY_BUNDLE_INDICES`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rich.table import Table

__all__ = ["ROLES", "TP_ROLE", "Bundle", "TopologyPlan", "plan_topology"]

ROLES = ("generators", "scorers", "learner", "python_tools", "search_tools")
TP_ROLE = "generator_gpus"  # the one-GPU bundles of a TP > 1 generator


@dataclass(frozen=True)
class Bundle:
    role: str
    replica: int
    index: int  # bundle index inside the placement group
    num_cpus: float
    num_gpus: float

    def resources(self) -> dict[str, float]:
        res = {"CPU": self.num_cpus} if self.num_cpus > 0 or self.num_gpus <= 0 else {}
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

    def tp_bundle_indices(self, replica: int) -> list[int]:
        """Placement-group indices of generator `replica`'s one-GPU bundles (empty when TP = 1)."""
        return [b.index for b in self.bundles if b.role == TP_ROLE and b.replica == replica]

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
    if cfg.tools.search.workers == 0 or getattr(cfg.tools.search, "service", None):
        return False  # no pool of its own (a shared named search service answers, `tools.search.service`)
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
        tp = int(getattr(cfg.engine, "tensor_parallel_size", 1) or 1) if role == "generators" else 1
        for i in range(replicas):
            if tp > 1:  # the actor's CPUs, then one GPU per TP rank (topology.generators.num_gpus == TP)
                bundles.append(Bundle(role, i, len(bundles), float(r.num_cpus), 0.0))
                for _ in range(tp):
                    bundles.append(Bundle(TP_ROLE, i, len(bundles), 0.0, float(r.num_gpus) / tp))
                continue
            bundles.append(Bundle(role, i, len(bundles), float(r.num_cpus), float(r.num_gpus)))
    if float(topo.learner.num_gpus) > 1:
        from tepo_ray.config import ConfigError

        raise ConfigError(f"topology.learner.num_gpus={topo.learner.num_gpus:g}: each learner rank (FSDP2) uses one "
                          f"GPU; set topology.learner.num_gpus=1 and topology.learner.replicas to the number of GPUs "
                          f"to shard over")
    for role in ("generators", "learner"):
        if not any(b.role == role for b in bundles):
            from tepo_ray.config import ConfigError

            raise ConfigError(f"topology.{role}.replicas must be >= 1 to train")
    strategy = topo.strategy.value if hasattr(topo.strategy, "value") else str(topo.strategy)
    return TopologyPlan(strategy=strategy, bundles=tuple(bundles))
