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

Weight publication goes through `tepo_ray.weights` (`weights_cfg.transport`):
`collective` — the learner is rank 0 of a weight group (`open_weight_group`,
then `join_weight_group` with every receiver at once) and `send_weights`
broadcasts a version while the receivers receive it; no file is written.
`file` — each step writes `<run_dir>/weights/v{N}.safetensors` (opt-in, one node).
`train_step_and_publish` returns the `WeightUpdate` dict receivers need.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import ray

from tepo_ray.records import Trajectory
from tepo_ray.trainer.checkpoint import load_latest
from tepo_ray.trainer.learner import Learner
from tepo_ray.weights import WeightUpdate, group, make_transport

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
        weights_cfg: Any = None,
        **learner_kwargs: Any,
    ) -> None:
        """`weights_cfg`: the `weights` config (transport); None = the `file` transport."""
        ckpt_dir = Path(trainer_cfg.checkpoint_dir) if trainer_cfg.checkpoint_dir else Path(run_dir) / "checkpoints"
        resuming = resume and load_latest(ckpt_dir) is not None
        if weights_cfg is None:
            from types import SimpleNamespace

            weights_cfg = SimpleNamespace(transport="file", bucket_mb=256)
        self.weights_cfg = weights_cfg
        keep = int(learner_kwargs.get("keep_weight_versions", 4))
        self.transport = make_transport(weights_cfg, weights_dir=Path(run_dir) / "weights", keep=keep)
        files = self.transport.kind == "file"
        self.learner = Learner(
            model_path, algo_cfg=algo_cfg, trainer_cfg=trainer_cfg, run_dir=run_dir, seed=seed,
            publish_initial=files and not resuming, publish_files=files, **learner_kwargs,
        )
        self._restored: dict[str, Any] | None = self.learner.restore(ckpt_dir) if resuming else None
        self._last_rewards: list[tuple[str, float, float]] = []

    def ready(self) -> dict[str, Any]:
        info = self.learner.ready()
        info["pid"] = os.getpid()
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
    ) -> tuple[dict[str, float], dict[str, Any], int]:
        """`train_step`, then (metrics, WeightUpdate dict, version) of the new weights.

        `file`: the file is already written. `collective`: the caller starts `send_weights(update)`
        here and the receivers' receive together."""
        metrics = self.train_step(trajectories)
        return metrics, self.weight_update(), self.learner.version

    # ------------------------------------------------------------------ weight publication
    def weight_update(self) -> dict[str, Any]:
        """The `WeightUpdate` (as a dict) of the current version."""
        return self.transport.describe(self.learner.model, version=self.learner.version).to_dict()

    def open_weight_group(self, *, name: str, world_size: int, backend: str = "auto",
                          timeout_s: float = 600.0) -> dict[str, Any]:
        """Rank 0's rendezvous endpoint on this node (returns at once); every member then joins with it."""
        import ray

        host = ray.util.get_node_ip_address()
        info = group.open_endpoint(name=name, host=host, world_size=world_size, backend=backend, timeout_s=timeout_s)
        return info.to_dict()

    def join_weight_group(self, info: dict[str, Any]) -> int:
        """Join as rank 0 (blocks until every receiver joined); later updates are sent on this group."""
        old = getattr(self.transport, "group_name", None)
        dev = next(self.learner.model.parameters()).device
        group.join(info, rank=0, device=dev if dev.type == "cuda" else None)
        if old and old != info["name"]:
            group.leave(old)
        self.transport.group_name = info["name"]
        return 0

    def sequence_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        """Teacher-forced log π(s[t] | s[:t]) (temperature 1) of the learner's current weights, per sequence."""
        import torch

        model = self.learner.model
        was_training = model.training
        model.eval()
        dev = next(model.parameters()).device
        try:
            with torch.no_grad():
                out = []
                for seq in sequences:
                    ids = torch.tensor([list(seq)], device=dev)  # [1, T]
                    logits = model(input_ids=ids).logits[0, :-1].float()  # [T-1, V]
                    out.append(torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None]).squeeze(-1).tolist())
                return out
        finally:
            model.train(was_training)

    def send_weights(self, update: dict[str, Any]) -> dict[str, float]:
        """Send `update` (must be the current version) to every receiver; returns bytes and seconds."""
        import time

        u = WeightUpdate.from_dict(update)
        if u.version != self.learner.version:
            raise ValueError(f"send_weights: update is v{u.version}, the learner holds v{self.learner.version}")
        t0 = time.perf_counter()
        sent = self.transport.send(u, self.learner.model)
        return {"bytes": float(sent), "seconds": time.perf_counter() - t0}

    def last_rewards(self) -> list[tuple[str, float, float]]:
        """(uid, score, reward) of every trajectory of the last step (rewards are computed here)."""
        return list(self._last_rewards)

    def publish_weights(self) -> tuple[str, int]:
        """`file` transport only: write the current version's file; (path, version)."""
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
