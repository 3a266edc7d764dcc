"""The learner's full weights as (HF name, tensor) pairs, in a fixed order.

`iter_full_state(model)` is the one reader of a (plain or FSDP2-sharded) model's full state: weight
transports, checkpoints' safetensors, exports and SFT outputs all go through it. Each DTensor entry is
gathered with `full_tensor()`, a collective: with FSDP2 every learner rank must iterate to the end, in
the same order (all ranks get the full tensors; typically only rank 0 uses them).

Contract:
* names are the model's `state_dict()` keys (Hugging Face names when `model` is the HF *ForCausalLM,
  persistent buffers included, non-persistent buffers such as rotary `inv_freq` excluded), in
  `state_dict()` order, identical on every call;
* `tied="skip"` (for transports): an entry that aliases an earlier one (tied weights: `lm_head.weight`
  with `tie_word_embeddings`) is not yielded -- receivers re-tie it (HF models share the parameter; vLLM
  skips `lm_head.weight` for tied models), which saves a vocab x hidden tensor per sync (22% of
  Qwen2-0.5B's bytes); a yielded tensor may be the live parameter itself (no copy);
* `tied="copy"` (for files and consumers that keep the tensors): every entry is yielded and each owns its
  memory -- aliases and live parameters are cloned (safetensors and vLLM's `load_weights` refuse aliases);
* `dtype` casts floating-point entries (fp32 master weights -> the generators' bf16), `device` moves them
  (e.g. "cpu" off the accelerator); every tensor is detached and contiguous;
* tensors are yielded one at a time, so a caller that packs them into bounded buckets never holds more
  than a bucket plus one tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

__all__ = ["ParamMeta", "iter_full_state", "full_state_dict", "param_metadata", "load_named_tensors",
           "state_mismatch"]


@dataclass(frozen=True)
class ParamMeta:
    """What a receiver must know to receive one tensor: its name, shape and dtype (as a string)."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # e.g. "float32" (torch.float32 without the prefix)

    @property
    def torch_dtype(self) -> torch.dtype:
        dt = getattr(torch, self.dtype, None)
        if not isinstance(dt, torch.dtype):
            raise ValueError(f"parameter {self.name!r}: dtype {self.dtype!r} is not a torch dtype")
        return dt

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= int(s)
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.torch_dtype).element_size()

    def to_list(self) -> list:
        return [self.name, list(self.shape), self.dtype]

    @classmethod
    def from_list(cls, item: list | tuple) -> "ParamMeta":
        name, shape, dtype = item
        return cls(str(name), tuple(int(s) for s in shape), str(dtype))


def _local(t: torch.Tensor) -> torch.Tensor:
    """The rank-local tensor of a DTensor (FSDP2 shard), else `t`."""
    return t.to_local() if hasattr(t, "to_local") else t


def _state_entries(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor, bool]]:
    """(name, tensor, aliases an earlier entry) for every state_dict entry. Tied weights view exactly the
    same memory; sharded (DTensor) entries are compared by their local shard's memory."""
    seen: set[tuple[int, tuple[int, ...], str]] = set()
    for name, t in model.state_dict(keep_vars=False).items():
        key = (_local(t).data_ptr(), tuple(t.shape), str(t.dtype))
        alias = bool(t.numel()) and key in seen
        seen.add(key)
        yield name, t, alias


def _meta_dtype(t: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    return dtype if dtype is not None and t.is_floating_point() else t.dtype


_TIED_MODES = ("skip", "copy")


def iter_full_state(model: torch.nn.Module, *, dtype: torch.dtype | None = None,
                    device: str | torch.device | None = None, tied: str = "skip"
                    ) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full tensor) for the entries of `model.state_dict()` (see the module docstring for `tied`)."""
    if tied not in _TIED_MODES:
        raise ValueError(f"iter_full_state(tied={tied!r}): expected one of {_TIED_MODES}")
    for name, t, alias in _state_entries(model):
        if alias and tied == "skip":
            continue
        src = t.detach()
        full = src.full_tensor() if hasattr(src, "full_tensor") else src
        if full.dtype != (target := _meta_dtype(full, dtype)):  # the rule param_metadata reports
            full = full.to(target)
        if device is not None:
            full = full.to(device)
        if tied == "copy" and (alias or full.data_ptr() == _local(src).data_ptr()):
            full = full.clone()  # an alias of the live parameter or of an entry already yielded
        yield name, (full if full.is_contiguous() else full.contiguous())


def full_state_dict(model: torch.nn.Module, **kwargs) -> dict[str, torch.Tensor]:
    """Every entry, each owning its memory: `dict(iter_full_state(model, tied="copy", **kwargs))`
    (collective under FSDP2: every rank must call it)."""
    return dict(iter_full_state(model, tied="copy", **kwargs))


def param_metadata(model: torch.nn.Module, *, dtype: torch.dtype | None = None) -> list[ParamMeta]:
    """`ParamMeta` of every tensor `iter_full_state(model, dtype=)` yields, in the same order (no copies made)."""
    return [ParamMeta(name, tuple(t.shape), str(_meta_dtype(t, dtype)).removeprefix("torch."))
            for name, t, alias in _state_entries(model) if not alias]


def state_mismatch(model: torch.nn.Module, names: "set[str] | list[str]") -> str | None:
    """Why a full update carrying `names` would not fit `model` (None when it fits); checked before loading,
    so a rejected update leaves the model untouched. Tied entries (lm_head.weight) may be absent."""
    own = model.state_dict(keep_vars=True)
    names = set(names)
    unexpected = sorted(names - set(own))
    loaded_ptrs = {own[k].data_ptr() for k in names if k in own}
    missing = sorted(k for k in set(own) - names if own[k].data_ptr() not in loaded_ptrs)
    if not unexpected and not missing:
        return None
    return f"missing {missing[:8]}, unexpected {unexpected[:8]}"


def load_named_tensors(model: torch.nn.Module, named: "Iterator[tuple[str, torch.Tensor]]", *, what: str) -> int:
    """Copy (name, tensor) pairs into `model`'s state in place (dtype/device converted); returns how many.

    Every state entry must arrive, except ones tied to an entry that did
    (`lm_head.weight` with tied embeddings); an unknown name or a shape mismatch
    raises `ValueError` naming `what` (the update or file). The whole iterator is
    consumed even on error, so a collective receive stays in step.
    """
    own = model.state_dict(keep_vars=True)
    got: set[str] = set()
    unexpected: list[str] = []
    bad_shape: list[str] = []
    with torch.no_grad():
        for name, t in named:
            dst = own.get(name)
            if dst is None:
                unexpected.append(name)
                continue
            if tuple(dst.shape) != tuple(t.shape):
                bad_shape.append(f"{name}: {tuple(t.shape)} vs model {tuple(dst.shape)}")
                continue
            dst.data.copy_(t)
            got.add(name)
    loaded_ptrs = {own[k].data_ptr() for k in got}
    missing = sorted(k for k in set(own) - got if own[k].data_ptr() not in loaded_ptrs)
    if unexpected or missing or bad_shape:
        raise ValueError(f"{what} does not match the model: missing {missing[:8]}, unexpected {unexpected[:8]}, "
                         f"wrong shapes {bad_shape[:4]} (expected the learner's full state dict with HF names)")
    return len(got)
