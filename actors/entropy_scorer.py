"""EntropyScorerActor: behaviour-version scoring (tepo_ray.trainer.EntropyScorer) as a Ray actor.

`EntropyScorerWorker` is the plain class (testable without Ray);
`EntropyScorerActor = ray.remote(EntropyScorerWorker)` is what the driver
creates, with its placement and `max_restarts=-1` in `.options(...)`. No math
lives here.

Weights arrive with `receive_weights(update)` (the `tepo_ray.weights`
collective transport: the scorer holds the last `cache_size` versions in memory
and the driver re-sends what a restarted scorer lost) or, with the `file`
transport, as paths.

Restartable: the only state is which weight version is loaded and where each
version lives. A version is found again in `weights_dir`, or next to any
registered `v{N}.safetensors` file (the learner publishes all versions into
one directory), so a restarted scorer needs only its constructor arguments
and the path the driver sends with the next batch.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import ray

from actors.learner import as_trajectories
from tepo_ray.records import Trajectory
from tepo_ray.trainer.scorer import EntropyScorer

__all__ = ["EntropyScorerWorker", "EntropyScorerActor"]


class EntropyScorerWorker:
    def __init__(self, model_path: str, *, algo_cfg: Any, weights_dir: str | None = None, device: str = "cpu",
                 name: str = "scorer-0", **scorer_kwargs: Any) -> None:
        self.name = name
        self.scorer = EntropyScorer(model_path, algo_cfg=algo_cfg, device=device, weights_dir=weights_dir,
                                    **scorer_kwargs)

    def ready(self) -> dict[str, Any]:
        info = self.scorer.ready()
        info["name"] = self.name
        info["pid"] = os.getpid()
        return info

    def load_weights(self, path: str, version: int) -> int:
        return self.scorer.load_weights(path, version)

    def register_weights(self, path: str, version: int) -> None:
        self.scorer.register_weights(path, version)

    def join_weight_group(self, info: dict[str, Any], rank: int) -> int:
        """Join the learner's weight group as `rank` (blocks until all members joined)."""
        from tepo_ray.weights import group

        group.join(info, rank=rank, device=self.scorer.device if str(self.scorer.device).startswith("cuda") else None)
        return rank

    def weight_ranks(self) -> int:
        return 1

    def receive_weights(self, update: dict[str, Any]) -> int:
        """Receive a published version (`tepo_ray.weights.WeightUpdate` dict) while the learner sends it."""
        return self.scorer.receive_weights(update)

    def score(
        self,
        trajectories: Sequence[Trajectory | dict[str, Any]],
        *,
        weights_path: str | None = None,
        version: int | None = None,
    ) -> list[Trajectory | dict[str, Any]]:
        """Scored trajectories, in the input order and form (Trajectory objects or dicts).

        `weights_path` / `version`, when given, register where that version's weights
        live before scoring (each trajectory is still scored with its own behaviour version).
        """
        if (weights_path is None) != (version is None):
            raise ValueError("pass weights_path and version together (or neither)")
        if weights_path is not None:
            self.scorer.register_weights(weights_path, int(version))
        as_dicts = bool(trajectories) and isinstance(trajectories[0], dict)
        scored = self.scorer.score(as_trajectories(trajectories))
        return [t.to_dict() for t in scored] if as_dicts else scored

    def stats(self) -> dict[str, Any]:
        return {"version": self.scorer.version, "weight_loads": self.scorer.loads,
                "last_score_time_s": self.scorer.last_score_time_s,
                "total_score_time_s": self.scorer.total_score_time_s}


EntropyScorerActor = ray.remote(EntropyScorerWorker)
