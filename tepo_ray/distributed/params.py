"""Full (name, tensor) pairs of a plain or FSDP2-sharded model, in Hugging Face names.

Contract of `iter_full_state(model)`:
* yields `(name, tensor)` for every entry of `model.state_dict()` (HF parameter
  names when `model` is the HF *ForCausalLM — not a wrapper around it), each a
  full, unsharded, detached tensor that the consumer may keep;
* a sharded parameter (DTensor) is gathered with `.full_tensor()`, which is a
  collective: with FSDP2 EVERY rank must iterate to the end, in the same order
  (all ranks get the full tensors; typically only rank 0 uses them);
* tensors that share storage (tied `lm_head.weight` / `embed_tokens.weight`)
  are cloned, so each yielded tensor owns its memory (safetensors and vLLM's
  `load_weights` refuse aliases);
* `dtype` casts each tensor (e.g. fp32 master weights -> bf16 for generators);
  `device="cpu"` moves it off the accelerator.
"""

from __future__ import annotations

from typing import Iterator

import torch

__all__ = ["iter_full_state", "full_state_dict"]


def _full(t: torch.Tensor) -> torch.Tensor:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        DTensor = ()  # type: ignore[assignment]
    if isinstance(t, DTensor):
        return t.full_tensor()
    return t


def iter_full_state(
    model: torch.nn.Module, *, dtype: torch.dtype | None = None, device: str | torch.device | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    seen: set[tuple[int, int]] = set()
    for name, t in model.state_dict().items():
        src = t.detach()
        local = src.to_local() if hasattr(src, "to_local") else src
        key = (local.untyped_storage().data_ptr(), local.storage_offset()) if local.numel() else (id(local), 0)
        full = _full(src)
        if dtype is not None and full.is_floating_point():
            full = full.to(dtype)
        if device is not None:
            full = full.to(device)
        if key in seen or full.data_ptr() == local.data_ptr():  # alias of the live param or of a yielded tensor
            full = full.clone()
        seen.add(key)
        yield name, full


def full_state_dict(model: torch.nn.Module, **kwargs) -> dict[str, torch.Tensor]:
    """`dict(iter_full_state(model))` (collective under FSDP2: every rank must call it)."""
    return dict(iter_full_state(model, **kwargs))
