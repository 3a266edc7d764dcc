"""FSDP2 learner on 2 gloo ranks (CPU) = the single-process learner on the same batch; its DCP
checkpoint resumes on 2 ranks and loads into 1 process and `export`.

Tolerances (fp32): loss, grad norm and metrics rel 1e-5; every gradient element
atol 1e-7 + rtol 1e-4 (summation order across ranks is the only difference).
Weights after one AdamW step (lr 1e-3): >= 99.9% of elements within 1e-6 and
all within 2 x lr. Adam divides by sqrt(v), so an element whose gradient is
~1e-8 turns its rounding difference into up to a whole step (measured: 1 of
~8k elements per run, up to 1.5e-4, a different one each run) — the gradient
check is the exact one.
"""


from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from tepo_ray.config import AlgoConfig, TrainerConfig
from tepo_ray.weights.params import full_state_dict
from tepo_ray.trainer.learner import Learner, LearnerMetric
from tepo_ray.trainer.scorer import EntropyScorer

from ranks import run_ranks
from trainer_factories import make_group

ALGO = dict(mode="dense", alpha=0.5, lr=1e-3, entropy_chunk_size=5, kl_coef=0.01)


def _batch(model_path: str):
    # 7 sequences: rank 0 trains 4 (2 micro-batches of <= 3), rank 1 trains 3 (1 + a weight-0 filler)
    batch = make_group("g0", scores=[1.0, 0.0, 0.5], seed=0) + make_group("g1", scores=[0.0, 1.0, 1.0, 0.2], seed=1)
    return EntropyScorer(model_path, algo_cfg=AlgoConfig()).score(batch)


def _sharded_step(rank: int, world: int, model_path: str, run_dir: str, batch, out: str) -> None:
    learner = Learner(model_path, algo_cfg=AlgoConfig(**ALGO), trainer_cfg=TrainerConfig(micro_batch_size=3),
                      run_dir=run_dir, seed=0, sharded=True)
    assert learner.world_size == world
    metrics = learner.compute_gradients(batch)
    grads = {n: p.grad.full_tensor() for n, p in learner.model.named_parameters()}  # collective
    metrics.update(learner.apply_update())
    state = full_state_dict(learner.model)  # collective: both ranks
    learner.save_checkpoint({"cursor": 3})  # collective
    again = Learner(model_path, algo_cfg=AlgoConfig(**ALGO), trainer_cfg=TrainerConfig(micro_batch_size=3),
                    run_dir=run_dir, seed=0, sharded=True, publish_initial=False)
    extra = again.restore()
    resumed = full_state_dict(again.model)
    same = all(torch.equal(resumed[k], v) for k, v in state.items()) and again.version == 1
    if rank == 0:
        torch.save({"metrics": metrics, "state": state, "grads": grads, "resumed_equal": same, "extra": extra}, out)


@pytest.mark.slow
def test_two_ranks_match_one_process(tiny_model: str, tmp_path: Path) -> None:
    batch = _batch(tiny_model)
    single = Learner(tiny_model, algo_cfg=AlgoConfig(**ALGO), trainer_cfg=TrainerConfig(micro_batch_size=3),
                     run_dir=tmp_path / "single", seed=0)
    before = {k: v.clone() for k, v in single.model.state_dict().items()}
    ref_metrics = single.compute_gradients(copy.deepcopy(batch))
    ref_grads = {n: p.grad.clone() for n, p in single.model.named_parameters()}
    ref_metrics.update(single.apply_update())
    ref_state = single.model.state_dict()

    out = tmp_path / "rank0.pt"
    run_ranks(_sharded_step, 2, tiny_model, str(tmp_path / "sharded"), copy.deepcopy(batch), str(out))
    got = torch.load(out, weights_only=False)

    for key in (LearnerMetric.LOSS, LearnerMetric.GRAD_NORM, LearnerMetric.TOKENS, LearnerMetric.APPROX_KL,
                LearnerMetric.REF_KL, LearnerMetric.PG_CLIP_FRAC, LearnerMetric.REWARD_MEAN):
        assert got["metrics"][key] == pytest.approx(ref_metrics[key], rel=1e-5, abs=1e-7), key
    assert got["metrics"][LearnerMetric.GRAD_NORM] > 0
    assert set(got["state"]) == set(ref_state)
    for name, ref in ref_grads.items():
        torch.testing.assert_close(got["grads"][name], ref, rtol=1e-4, atol=1e-7,
                                   msg=lambda m, name=name: f"grad of {name}: {m}")
    moved, far, total = 0, 0, 0
    for name, ref in ref_state.items():
        diff = (got["state"][name] - ref).abs()
        assert float(diff.max()) <= 2 * ALGO["lr"], name
        far += int((diff > 1e-6).sum())
        total += diff.numel()
        moved += int(not torch.equal(before[name], ref))
    assert far <= 1e-3 * total, f"{far} of {total} weights differ by > 1e-6"
    assert moved > len(ref_state) // 2  # the step really changed the weights
    # rank 0 published the gathered weights as version 1, identical to the ones it returned
    from safetensors.torch import load_file

    published = load_file(str(tmp_path / "sharded" / "weights" / "v1.safetensors"))
    for name, t in published.items():
        assert torch.equal(t, got["state"][name]), name

    # The 2-rank checkpoint resumed on 2 ranks, loads into one unsharded process, and exports.
    assert got["resumed_equal"] and got["extra"] == {"cursor": 3}
    ckpts = tmp_path / "sharded" / "checkpoints"
    plain = Learner(tiny_model, algo_cfg=AlgoConfig(**ALGO), trainer_cfg=TrainerConfig(micro_batch_size=3),
                    run_dir=tmp_path / "plain", seed=0)
    assert plain.restore(ckpts) == {"cursor": 3}
    for name, t in plain.model.state_dict().items():
        assert torch.equal(t, got["state"][name]), name
    from transformers import AutoModelForCausalLM

    from tepo_ray.trainer.checkpoint import export_model_dir, load_latest

    out_dir = export_model_dir(load_latest(ckpts).path, tmp_path / "exported")
    hf = AutoModelForCausalLM.from_pretrained(str(out_dir))
    for name, t in hf.state_dict().items():
        assert torch.equal(t, got["state"][name]), name
