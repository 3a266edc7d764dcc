"""Shard a causal LM with torch FSDP2 (`torch.distributed.fsdp.fully_shard`).

Contract of `shard_policy(policy, param_dtype=, reduce_dtype=)`:
* `policy` is a `trainer.batching.PolicyLogprobs` over a Hugging Face
  *ForCausalLM whose parameters are fp32 (the master weights the optimizer
  updates); a process group must exist (`process_group.init_process_group`).
* each decoder layer (`model.model.layers[i]`) becomes its own FSDP unit, and
  `policy` the root unit holding the rest (embeddings, final norm, output head —
  tied weights stay in one unit). Calling `policy(...)` all-gathers each unit's
  parameters just before use and frees them after; backward reduce-scatters
  the gradients (averaged over ranks; callers that want a sum scale the loss).
* `param_dtype` != float32 turns on mixed precision: compute in `param_dtype`
  (bf16 on GPU), gradients reduced in `reduce_dtype` (fp32), sharded params and
  optimizer state stay fp32.
* afterwards every parameter of `policy.model` is a DTensor with its original
  name (so `tepo_ray.weights.params.iter_full_state(policy.model)` yields HF names), and
  `policy.model.state_dict()` is the sharded state DCP checkpoints.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["decoder_layers", "shard_policy"]


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks of a HF causal LM (`model.model.layers`)."""
    backbone = getattr(model, "model", None)
    layers = getattr(backbone, "layers", None)
    if layers is None:
        raise TypeError(f"{type(model).__name__} has no `model.layers`; expected a HF decoder-only *ForCausalLM")
    return list(layers)


def shard_policy(
    policy: torch.nn.Module,
    *,
    param_dtype: torch.dtype = torch.float32,
    reduce_dtype: torch.dtype = torch.float32,
    reshard_after_forward: bool = True,
) -> torch.nn.Module:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    bad = sorted({str(p.dtype) for p in policy.parameters() if p.dtype != torch.float32})
    if bad:
        raise ValueError(f"shard_policy expects fp32 master weights, got parameters in {bad}; load the model in "
                         f"float32 and pass param_dtype for mixed precision")
    kwargs: dict[str, Any] = {"reshard_after_forward": reshard_after_forward}
    if param_dtype != torch.float32:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for layer in decoder_layers(policy.model):
        fully_shard(layer, **kwargs)
    fully_shard(policy, **kwargs)
    return policy
