"""Sharded SFT: `sft_train` on N Ray actors that form one FSDP2 group (the learner's code path).

`run_sft(model_path, examples=..., replicas=N, num_cpus=, num_gpus=, dtype=, **sft_kwargs)`:

* N == 1 and no GPU: `sft_train` in this process (the tiny model's path, no Ray needed);
* otherwise: N `SFTRank` actors (each `num_cpus`, `num_gpus` of `topology.learner`), created through
  `distributed.learner_group.LearnerGroup` (rank 0's node gives the rendezvous address), join one
  torch.distributed group (gloo on CPU, nccl on GPU), each runs `sft_train` on the same example list
  (the rank split is inside `sft_train`), and rank 0 writes the model directory. Returns rank 0's metrics.

The examples travel once through Ray's object store (shared by every rank).
"""

from __future__ import annotations

from typing import Any, Sequence

__all__ = ["SFTRank", "run_sft"]


class SFTRank:
    def __init__(self, *, rank: int, world_size: int, master_addr: str, master_port: int,
                 device: str = "auto") -> None:
        from tepo_ray.distributed import process_group
        from tepo_ray.distributed.device import select_device

        self.device = select_device(device)
        process_group.init_process_group(rank=rank, world_size=world_size, master_addr=master_addr,
                                         master_port=int(master_port), device=self.device)

    def train(self, model_path: str, examples: Sequence[Any], sft_kwargs: dict[str, Any]) -> dict[str, Any]:
        from tepo_ray.trainer.sft import sft_train

        return sft_train(model_path, examples=examples, device=self.device, **sft_kwargs)

    def ready(self) -> bool:
        return True


def run_sft(model_path: str, *, examples: Sequence[Any], replicas: int = 1, num_cpus: float = 1.0,
            num_gpus: float = 0.0, **sft_kwargs: Any) -> dict[str, Any]:
    """SFT on `replicas` FSDP2 ranks (or in-process for one CPU rank); see the module docstring."""
    if replicas < 1:
        raise ValueError(f"topology.learner.replicas={replicas}: expected >= 1")
    if replicas == 1 and num_gpus <= 0:
        from tepo_ray.trainer.sft import sft_train

        return sft_train(model_path, examples=examples, **sft_kwargs)
    import os

    import ray

    from tepo_ray.distributed.learner_group import LearnerGroup

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, include_dashboard=False)
    group = LearnerGroup.create(ray.remote(SFTRank), bundles=list(range(replicas)),
                                options=lambda _b: {"num_cpus": num_cpus, "num_gpus": num_gpus})
    try:
        return ray.get(group.train.remote(str(model_path), list(examples), dict(sft_kwargs)))
    finally:
        for actor in group.actors:
            ray.kill(actor)
