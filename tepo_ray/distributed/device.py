"""Device selection for a role from the resources its placement-group bundle gave it.

Contract: `device_for_gpus(gpu_ids)` is "cuda" when the bundle holds a GPU and
"cpu" otherwise; `select_device("auto")` reads `ray.get_gpu_ids()` inside a Ray
worker (Ray sets CUDA_VISIBLE_DEVICES to the bundle's GPUs, so the process sees
them as cuda:0..k-1 and "cuda" means its first one). An explicit device string
("cpu", "cuda", "cuda:1") is returned unchanged. A bundle with a GPU on a torch
build without CUDA is an error, never a silent fall-back to CPU.
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["device_for_gpus", "select_device"]


def device_for_gpus(gpu_ids: Sequence[int | str]) -> str:
    """ "cuda" when `gpu_ids` (the GPUs Ray assigned to this worker) is non-empty, else "cpu"."""
    if not gpu_ids:
        return "cpu"
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"this worker was given GPU(s) {list(gpu_ids)} but torch {torch.__version__} sees no CUDA device; "
            f"install a CUDA build of torch or set topology.<role>.num_gpus=0"
        )
    return "cuda"


def select_device(device: str = "auto") -> str:
    """Resolve "auto" from this Ray worker's GPUs (cpu outside Ray); other values pass through."""
    if device != "auto":
        return device
    try:
        import ray

        gpu_ids = ray.get_gpu_ids() if ray.is_initialized() else []
    except Exception:  # not in a Ray worker
        gpu_ids = []
    return device_for_gpus(gpu_ids)
