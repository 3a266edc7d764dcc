"""LearnerActor: the learner (tepo_ray.trainer.Learner) as a Ray actor.

`LearnerWorker` is the plain class (testable without Ray); `LearnerActor =
ray.remote(LearnerWorker)` is what the driver creates, with its placement and
`max_restarts=-1` in `.options(...)`. No math lives here.

Restartable: with `resume=True` (the default) the constructor restores the
newest complete checkpoint in the checkpoint directory, so an actor restarted
by Ray comes back at the last checkpointed step and version, and `restored()`
returns the driver's `extra` dict saved with it (data cursor, buffer state).
Steps after that checkpoint are lost; their weight files are deleted and
trajectories generated with them must be discarded by the driver.

Sharded: with `world_size > 1` the worker first joins the torch.distributed
group at `master_addr:master_port` as `rank` (gloo on CPU, nccl on GPU), then
builds a `Learner(sharded=True)`; the driver creates the ranks and talks to them
through `tepo_ray.distributed.learner_group.LearnerGroup`. A restarted rank
cannot rejoin a running group: restart the whole group. A single learner on a
GPU with `dtype` bf16/fp16 is sharded too, as a world of one, so its master
weights and optimizer state stay fp32. `device="auto"` (what the driver passes)
is the bundle's GPU when it has one, else CPU.
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
        rank: int = 0,
        world_size: int = 1,
        master_addr: str | None = None,
        master_port: int | None = None,
        **learner_kwargs: Any,
    ) -> None:
        from tepo_ray.distributed import process_group
        from tepo_ray.distributed.device import select_device

        learner_kwargs["device"] = select_device(learner_kwargs.get("device", "auto"))
        low_precision_gpu = learner_kwargs["device"].startswith("cuda") and learner_kwargs.get("dtype") not in (
            None, "float32")
        if world_size > 1 or low_precision_gpu:
            # A single GPU learner in bf16 also goes through FSDP2 (a world of one): fp32 master
            # weights and optimizer state, bf16 compute.
            if world_size > 1 and (master_addr is None or master_port is None):
                raise ValueError(f"world_size={world_size} needs master_addr and master_port (rank 0's rendezvous)")
            if world_size == 1:
                master_addr, master_port = "127.0.0.1", process_group.free_port()
            process_group.init_process_group(rank=rank, world_size=world_size, master_addr=master_addr,
                                             master_port=int(master_port), device=learner_kwargs["device"])
            learner_kwargs["sharded"] = True
        ckpt_dir = Path(trainer_cfg.checkpoint_dir) if trainer_cfg.checkpoint_dir else Path(run_dir) / "checkpoints"
        resuming = resume and load_latest(ckpt_dir) is not None
        self.learner = Learner(
            model_path, algo_cfg=algo_cfg, trainer_cfg=trainer_cfg, run_dir=run_dir, seed=seed,
            publish_initial=not resuming, **learner_kwargs,
        )
        self._restored: dict[str, Any] | None = self.learner.restore(ckpt_dir) if resuming else None
        self._last_rewards: list[tuple[str, float, float]] = []

    def ready(self) -> dict[str, Any]:
        info = self.learner.ready()
        info["pid"] = os.getpid()
        info["rank"] = self.learner.rank
        info["world_size"] = self.learner.world_size
        info["restored"] = self._restored is not None
        info["restore_note"] = self.learner.last_restore_note
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
