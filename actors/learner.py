"""LearnerActor: the learner (tepo_ray.trainer.Learner) as a Ray actor.

`LearnerWorker` is the plain class (testable without Ray); `LearnerActor =
ray.remote(LearnerWorker)` is what the driver creates, with its placement and
`max_restarts=-1` in `.options(...)`. No math lives here.

Restartable: with `resume=True` (the default), and always when Ray restarts
the actor after a crash, the constructor restores the newest complete checkpoint in the checkpoint directory, so an actor restarted
by Ray comes back at the last checkpointed step and version, and `restored()`
returns the driver's `extra` dict saved with it (data cursor, buffer state).
Steps after that checkpoint are lost; their weight files are deleted and
trajectories generated with them must be discarded by the driver.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import ray

from tepo_ray.records import Trajectory
from tepo_ray.trainer.checkpoint import load_latest
from tepo_ray.trainer.learner import Learner

__all__ = ["LearnerWorker", "LearnerActor", "as_trajectories"]


def as_trajectories(items: Sequence[Trajectory | dict[str, Any]]) -> list[Trajectory]:
    """Records crossing the actor boundary may be Trajectory objects or their `to_dict()` form."""
    return [Trajectory.from_dict(t) if isinstance(t, dict) else t for t in items]


def _was_reconstructed() -> bool:
    """True inside a Ray actor that Ray restarted after it died (False outside Ray)."""
    try:
        return bool(ray.is_initialized() and ray.get_runtime_context().was_current_actor_reconstructed)
    except Exception:  # not inside an actor
        return False


class LearnerWorker:
    def __init__(
        self,
        model_path: str,
        *,
        algo_cfg: Any,
        trainer_cfg: Any,
        run_dir: str,
        seed: int = 0,
        resume: bool = True,
        **learner_kwargs: Any,
    ) -> None:
        ckpt_dir = Path(trainer_cfg.checkpoint_dir) if trainer_cfg.checkpoint_dir else Path(run_dir) / "checkpoints"
        # A learner restarted by Ray always restores (never silently restarts at version 0).
        self.reconstructed = _was_reconstructed()
        resuming = (resume or self.reconstructed) and load_latest(ckpt_dir) is not None
        self.learner = Learner(
            model_path, algo_cfg=algo_cfg, trainer_cfg=trainer_cfg, run_dir=run_dir, seed=seed,
            publish_initial=not resuming, **learner_kwargs,
        )
        self._restored: dict[str, Any] | None = self.learner.restore(ckpt_dir) if resuming else None
        self._last_rewards: list[tuple[str, float, float]] = []

    def ready(self) -> dict[str, Any]:
        info = self.learner.ready()
        info["pid"] = os.getpid()
        info["restored"] = self._restored is not None
        info["restore_note"] = self.learner.last_restore_note
        info["reconstructed"] = self.reconstructed
        return info

    def restored(self) -> dict[str, Any] | None:
        """The `extra` dict of the checkpoint restored at construction (None when started fresh)."""
        return self._restored

    def train_step(self, trajectories: Sequence[Trajectory | dict[str, Any]]) -> dict[str, float]:
        """One update (weights published as the new version); returns the step's metrics."""
        trajs = as_trajectories(trajectories)
        metrics = self.learner.train_step(trajs)
        self._last_rewards = [(t.uid, float(t.score), float(t.reward)) for t in trajs]
        return metrics

    def train_step_and_publish(
        self, trajectories: Sequence[Trajectory | dict[str, Any]]
    ) -> tuple[dict[str, float], str, int]:
        """`train_step`, then (metrics, path, version) of the weights it published."""
        metrics = self.train_step(trajectories)
        path, version = self.learner.latest_weights()
        return metrics, path, version

    def last_rewards(self) -> list[tuple[str, float, float]]:
        """(uid, score, reward) of every trajectory of the last step (rewards are computed here)."""
        return list(self._last_rewards)

    def publish_weights(self) -> tuple[str, int]:
        return self.learner.publish_weights()

    def latest_weights(self) -> tuple[str, int]:
        return self.learner.latest_weights()

    def checkpoint_due(self) -> bool:
        return self.learner.checkpoint_due()

    def save_checkpoint(self, extra: dict[str, Any] | None = None) -> str:
        return self.learner.save_checkpoint(extra)

    def restore(self, ckpt_dir: str | None = None) -> dict[str, Any] | None:
        """Restore the newest complete checkpoint; its `extra` dict, or None when there is none."""
        root = Path(ckpt_dir) if ckpt_dir else self.learner.checkpoint_dir
        if load_latest(root) is None:
            return None
        self._restored = self.learner.restore(root)
        return self._restored

    def state(self) -> dict[str, int]:
        return {"step": self.learner.step, "version": self.learner.version}


LearnerActor = ray.remote(LearnerWorker)
