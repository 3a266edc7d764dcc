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

Sharded: with `world_size > 1` the worker first joins the torch.distributed
group at `master_addr:master_port` as `rank` (gloo on CPU, nccl on GPU), then
builds a `Learner(sharded=True)`; the driver creates the ranks and talks to them
through `tepo_ray.distributed.learner_group.LearnerGroup`. A restarted rank
cannot rejoin a running group: restart the whole group. A single learner on a
GPU with `dtype` bf16/fp16 is sharded too, as a world of one, so its master
weights and optimizer state stay fp32. `device="auto"` (what the driver passes)
is the bundle's GPU when it has one, else CPU.

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
        rank: int = 0,
        world_size: int = 1,
        master_addr: str | None = None,
        master_port: int | None = None,
        weights_cfg: Any = None,
        **learner_kwargs: Any,
    ) -> None:
        """`weights_cfg`: the `weights` config (transport); None = the `file` transport."""
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
        # A learner restarted by Ray always restores (never silently restarts at version 0).
        self.reconstructed = _was_reconstructed()
        resuming = (resume or self.reconstructed) and load_latest(ckpt_dir) is not None
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
        info["rank"] = self.learner.rank
        info["world_size"] = self.learner.world_size
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
    ) -> tuple[dict[str, float], dict[str, Any], int]:
        """`train_step`, then (metrics, WeightUpdate dict, version) of the new weights.

        `file`: the file is already written. `collective`: the caller starts `send_weights(update)`
        here and the receivers' receive together."""
        metrics = self.train_step(trajectories)
        return metrics, self.weight_update(), self.learner.version

    # ------------------------------------------------------------------ weight publication
    # Only learner rank 0 is a member of the weight group. In a sharded group every method is called
    # on every rank (LearnerGroup); the other ranks return None / 0 at once, except `send_weights`,
    # where they take part in gathering the full tensors from the FSDP2 shards (a collective).
    def _send_dtype(self) -> Any:
        """What receivers get: the compute dtype (`model.dtype`); sharded fp32 masters are cast to it."""
        from tepo_ray.trainer.checkpoint import DTYPES

        return DTYPES.get(self.learner.compute_dtype)

    def weight_update(self) -> dict[str, Any] | None:
        """The `WeightUpdate` (as a dict) of the current version (rank 0; None on other ranks)."""
        if self.learner.rank != 0:
            return None
        return self.transport.describe(self.learner.model, version=self.learner.version,
                                       dtype=self._send_dtype()).to_dict()

    def open_weight_group(self, *, name: str, world_size: int, backend: str = "auto",
                          timeout_s: float = 600.0) -> dict[str, Any] | None:
        """Rank 0's rendezvous endpoint on this node (returns at once); every member then joins with it."""
        import ray

        if self.learner.rank != 0:
            return None
        host = ray.util.get_node_ip_address()
        info = group.open_endpoint(name=name, host=host, world_size=world_size, backend=backend, timeout_s=timeout_s)
        return info.to_dict()

    def join_weight_group(self, info: dict[str, Any]) -> int:
        """Join as rank 0 (blocks until every receiver joined); later updates are sent on this group."""
        if self.learner.rank != 0:
            return 0
        old = getattr(self.transport, "group_name", None)
        dev = next(self.learner.model.parameters()).device
        group.join(info, rank=0, device=dev if dev.type == "cuda" else None)
        if old and old != info["name"]:
            group.leave(old)
        self.transport.group_name = info["name"]
        return 0

    def sequence_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        """Teacher-forced log π(s[t] | s[:t]) (temperature 1) of the learner's current weights, per sequence.

        Runs through the learner's `PolicyLogprobs` (the FSDP2 root unit when sharded: a collective,
        every rank calls it with the same sequences)."""
        import torch

        policy = self.learner.policy
        was_training = policy.training
        policy.eval()
        dev = next(self.learner.model.parameters()).device
        try:
            with torch.no_grad():
                out = []
                for seq in sequences:
                    ids = torch.tensor([list(seq)], device=dev)  # [1, T]
                    ones = torch.ones_like(ids)  # [1, T]
                    lp, _ = policy(ids, ones, ones, chunk_size=1024)  # [1, T]: log π(s[t] | s[:t]) at t >= 1
                    out.append(lp[0, 1:].float().tolist())
                return out
        finally:
            policy.train(was_training)

    def send_weights(self, update: dict[str, Any]) -> dict[str, float]:
        """Send `update` (must be the current version) to every receiver; returns bytes and seconds.

        Sharded ranks other than 0 gather the full tensors with rank 0 and drop them."""
        import time

        from tepo_ray.weights.params import iter_full_state

        u = WeightUpdate.from_dict(update)
        if u.version != self.learner.version:
            raise ValueError(f"send_weights: update is v{u.version}, the learner holds v{self.learner.version}")
        t0 = time.perf_counter()
        named = iter_full_state(self.learner.model, dtype=self._send_dtype())
        if self.learner.rank != 0:
            for _ in named:  # the all-gathers of every sharded parameter, in rank 0's order
                pass
            return {"bytes": 0.0, "seconds": time.perf_counter() - t0}
        sent = self.transport.send(u, named)
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
