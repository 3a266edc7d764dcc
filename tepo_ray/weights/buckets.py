"""Bounded buckets: many tensors packed into one flat byte buffer per collective call.

Both sides compute the same plan from the same `ParamMeta` list and byte budget
(`plan_buckets` is deterministic), so only the metadata travels out of band.
A bucket holds consecutive tensors whose bytes sum to at most `bucket_bytes`; a
tensor larger than the budget travels alone. Peak extra memory on either side
is therefore max(bucket_bytes, largest tensor), never the whole model.

Packing reinterprets each tensor's bytes as uint8 (any dtype, no conversion), so
a bucket is one `broadcast` of a `[nbytes] uint8` tensor.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Sequence

import torch

from tepo_ray.weights.params import ParamMeta

__all__ = ["plan_buckets", "pack_bucket", "unpack_bucket"]


def plan_buckets(params: Sequence[ParamMeta], *, bucket_bytes: int) -> list[list[int]]:
    """Indices into `params`, grouped into consecutive buckets of <= bucket_bytes (oversized tensors alone)."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    buckets: list[list[int]] = []
    cur: list[int] = []
    size = 0
    for i, p in enumerate(params):
        n = p.nbytes
        if cur and size + n > bucket_bytes:
            buckets.append(cur)
            cur, size = [], 0
        cur.append(i)
        size += n
    if cur:
        buckets.append(cur)
    return buckets


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)  # [nbytes]


def pack_bucket(tensors: Iterable[torch.Tensor], *, nbytes: int, device: torch.device | str) -> torch.Tensor:
    """One `[nbytes] uint8` buffer on `device` holding the tensors' bytes back to back."""
    buf = torch.empty(nbytes, dtype=torch.uint8, device=device)  # [nbytes]
    off = 0
    for t in tensors:
        b = _as_bytes(t)
        buf[off : off + b.numel()].copy_(b)
        off += b.numel()
    if off != nbytes:
        raise ValueError(f"bucket holds {off} bytes of tensors, planned {nbytes}")
    return buf


def unpack_bucket(buf: torch.Tensor, params: Sequence[ParamMeta]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor view into `buf`) for each planned tensor; the views live as long as `buf`."""
    off = 0
    for p in params:
        n = p.nbytes
        yield p.name, buf[off : off + n].view(p.torch_dtype).view(p.shape)
        off += n
    if off != buf.numel():
        raise ValueError(f"bucket buffer has {buf.numel()} bytes, its tensors {off}")
