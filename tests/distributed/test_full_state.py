"""`iter_full_state`: full tensors in HF names for plain and FSDP2 models; tied weights skipped (transports)
or cloned (files)."""

from __future__ import annotations

import pytest
import torch

from tepo_ray.distributed.device import device_for_gpus, select_device
from tepo_ray.distributed.fsdp import shard_policy
from tepo_ray.weights.params import full_state_dict, iter_full_state
from tepo_ray.trainer.batching import PolicyLogprobs
from tepo_ray.trainer.checkpoint import load_policy


def test_plain_tied_model_yields_owned_copies(tiny_tied_model: str) -> None:
    model = load_policy(tiny_tied_model)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    state = dict(iter_full_state(model, tied="copy"))
    assert list(state) == list(model.state_dict())
    assert "lm_head.weight" in state and "model.embed_tokens.weight" in state
    assert state["lm_head.weight"].data_ptr() != state["model.embed_tokens.weight"].data_ptr()
    ptrs = {p.data_ptr() for p in model.parameters()}
    assert not any(t.data_ptr() in ptrs for t in state.values())  # the consumer may keep or modify them
    for name, t in model.state_dict().items():
        assert torch.equal(state[name], t), name
    half = full_state_dict(model, dtype=torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in half.values())


def test_skip_mode_leaves_tied_aliases_out_without_copying(tiny_tied_model: str) -> None:
    model = load_policy(tiny_tied_model)
    state = list(iter_full_state(model))  # tied="skip", what weight transports read
    names = [name for name, _ in state]
    assert names == [n for n in model.state_dict() if n != "lm_head.weight"]
    ptrs = {p.data_ptr() for p in model.parameters()}
    assert all(t.data_ptr() in ptrs for name, t in state if name.endswith(".weight"))  # live, no copy
    with pytest.raises(ValueError, match="tied='both'"):
        next(iter_full_state(model, tied="both"))


def test_fsdp2_sharded_model_gathers_full_tensors(world_of_one, tiny_tied_model: str) -> None:
    plain = load_policy(tiny_tied_model).state_dict()
    model = load_policy(tiny_tied_model)
    shard_policy(PolicyLogprobs(model))
    from torch.distributed.tensor import DTensor

    assert all(isinstance(p, DTensor) for p in model.parameters())
    state = full_state_dict(model)
    assert set(state) == set(plain)
    for name, t in plain.items():
        assert not isinstance(state[name], DTensor)
        assert torch.equal(state[name], t), name


def test_shard_policy_rejects_low_precision_master_weights(world_of_one, tiny_model: str) -> None:
    with pytest.raises(ValueError, match="fp32 master weights"):
        shard_policy(PolicyLogprobs(load_policy(tiny_model, dtype="bfloat16")), param_dtype=torch.bfloat16)


def test_device_from_bundle_gpus() -> None:
    assert device_for_gpus([]) == "cpu"
    assert select_device("cpu") == "cpu" and select_device("cuda:1") == "cuda:1"
    assert select_device("auto") == "cpu"  # outside Ray / no GPU in the bundle
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="num_gpus=0"):
            device_for_gpus([0])
    else:
        assert device_for_gpus([0]) == "cuda"
