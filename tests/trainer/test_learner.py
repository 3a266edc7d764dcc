"""Learner: one real optimizer step on a tiny Qwen2, advantages per mode, accumulation, KL, weights."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from tepo_ray.config import AlgoConfig, TrainerConfig
from tepo_ray.records import RecordError
from tepo_ray.trainer.checkpoint import list_weight_versions, load_policy, load_weights_into, weight_file_path
from tepo_ray.trainer.learner import Learner, LearnerMetric
from tepo_ray.trainer.scorer import EntropyScorer

from trainer_factories import make_group, make_trajectory


def _scored_batch(model_path: str, *, seed: int = 0):
    batch = make_group("g0", scores=[1.0, 0.0, 0.5, 0.2], seed=seed) + make_group(
        "g1", scores=[0.0, 1.0, 1.0, 0.0], seed=seed + 1
    )
    return EntropyScorer(model_path, algo_cfg=AlgoConfig()).score(batch)


def _learner(model_path: str, run_dir, **algo) -> Learner:
    cfg = AlgoConfig(**{"mode": "dense", "lr": 1e-3, "entropy_chunk_size": 5, **algo})
    return Learner(model_path, algo_cfg=cfg, trainer_cfg=TrainerConfig(micro_batch_size=3), run_dir=run_dir, seed=0)


def test_step_changes_weights_and_publishes_loadable_file(tiny_model: str, tmp_path) -> None:
    learner = _learner(tiny_model, tmp_path)
    before = {k: v.clone() for k, v in learner.model.state_dict().items()}
    assert weight_file_path(tmp_path / "weights", 0).is_file()
    batch = _scored_batch(tiny_model)

    metrics = learner.train_step(batch)

    assert learner.version == 1 and learner.step == 1
    path, version = learner.latest_weights()
    assert version == 1 and path == str(weight_file_path(tmp_path / "weights", 1))
    fresh = load_policy(tiny_model)
    load_weights_into(fresh, path)
    after = learner.model.state_dict()
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, after[k]), k
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())
    assert metrics[LearnerMetric.TOKENS] == sum(t.num_generated for t in batch)
    # The scorer's behaviour log-probs are the learner's own at version 0: ratio 1, nothing clipped.
    assert metrics[LearnerMetric.APPROX_KL] < 1e-6
    assert metrics[LearnerMetric.PG_CLIP_FRAC] == 0.0
    assert metrics[LearnerMetric.GRAD_NORM] > 0
    assert metrics[LearnerMetric.TOOL_CALLS] == pytest.approx(sum(t.num_calls for t in batch) / len(batch))
    # Rewards are written back; with dense, the trajectory reward is the outcome F1.
    assert [t.reward for t in batch] == pytest.approx([1.0, 0.0, 0.5, 0.2, 0.0, 1.0, 1.0, 0.0])
    assert [t.score for t in batch] == [1.0, 0.0, 0.5, 0.2, 0.0, 1.0, 1.0, 0.0]


def test_dense_and_grpo_give_different_token_advantages(tiny_model: str, tmp_path) -> None:
    batch = _scored_batch(tiny_model)
    # Make I_{i,k} vary within each group so the dense bonus matters.
    for i, t in enumerate(batch):
        for k, c in enumerate(t.tool_calls):
            c.entropy_decreased = (i + k) % 2 == 0
    scores = torch.tensor([t.score for t in batch])
    adv = {}
    for mode in ("dense", "grpo"):
        learner = _learner(tiny_model, tmp_path / mode, mode=mode)
        adv[mode], _, _ = learner.compute_advantages(batch, scores)
    assert adv["dense"].shape == adv["grpo"].shape
    differs_on_call_segment = False
    for i, t in enumerate(batch):
        final = [s for s in t.segments if s.tool_call_index is None]
        for s in final:  # the final segment gets the outcome advantage in both modes
            assert torch.allclose(adv["dense"][i, s.start : s.end], adv["grpo"][i, s.start : s.end], atol=1e-6)
        for c in t.tool_calls:
            s = t.segments[c.segment_index]
            seg = adv["dense"][i, s.start : s.end]
            assert torch.all(seg == seg[0])  # one A^tool_{i,k} per segment
            if not torch.allclose(seg, adv["grpo"][i, s.start : s.end], atol=1e-4):
                differs_on_call_segment = True
        masked = torch.tensor(t.loss_mask + [0] * (adv["dense"].shape[1] - len(t.loss_mask))) == 0
        assert torch.all(adv["dense"][i][masked] == 0) and torch.all(adv["grpo"][i][masked] == 0)
    assert differs_on_call_segment


def test_micro_batches_accumulate_to_the_full_batch_gradient(tiny_model: str, tmp_path) -> None:
    batch = _scored_batch(tiny_model)
    grads = {}
    for mbs in (1, 3, 8):
        cfg = AlgoConfig(mode="sparse", lr=1e-3)
        learner = Learner(tiny_model, algo_cfg=cfg, trainer_cfg=TrainerConfig(micro_batch_size=mbs),
                          run_dir=tmp_path / str(mbs), seed=0, publish_initial=False)
        metrics = learner.compute_gradients(copy.deepcopy(batch))
        grads[mbs] = ({n: p.grad.clone() for n, p in learner.model.named_parameters() if p.grad is not None},
                      metrics[LearnerMetric.LOSS])
    ref, ref_loss = grads[8]
    assert any(g.abs().max() > 0 for g in ref.values())
    for mbs in (1, 3):
        g, loss = grads[mbs]
        assert loss == pytest.approx(ref_loss, abs=1e-6)
        for n in ref:
            assert torch.allclose(g[n], ref[n], atol=1e-6, rtol=1e-4), n


def test_kl_to_frozen_reference(tiny_model: str, tmp_path) -> None:
    learner = _learner(tiny_model, tmp_path, kl_coef=0.1, mode="grpo")
    assert learner.ref_model is not None
    m1 = learner.train_step(_scored_batch(tiny_model))
    assert m1[LearnerMetric.REF_KL] == pytest.approx(0.0, abs=1e-7)  # policy == reference before the first update
    m2 = learner.train_step(_scored_batch(tiny_model, seed=5))
    assert m2[LearnerMetric.REF_KL] > 0
    assert m2[LearnerMetric.APPROX_KL] > 0  # behaviour (v0) log-probs are now stale by one version
    assert m2[LearnerMetric.STALENESS_MEAN] == 1.0


def test_outcome_scores_computed_when_missing(tiny_model: str, tmp_path) -> None:
    trajs = [
        make_trajectory(uid="a", group_id="g", answer="Paris", gold=["paris"], seed=1),
        make_trajectory(uid="b", group_id="g", answer="the big cat", gold=["big dog"], seed=2),
        make_trajectory(uid="c", group_id="g", answer=None, gold=["x"], seed=3),
        make_trajectory(uid="d", group_id="g", answer="4", gold=["4"], seed=4, score=0.25),  # set by the driver
    ]
    EntropyScorer(tiny_model, algo_cfg=AlgoConfig()).score(trajs)
    learner = _learner(tiny_model, tmp_path, mode="grpo")
    metrics = learner.train_step(trajs)
    assert [t.score for t in trajs] == [1.0, 0.5, 0.0, 0.25]
    assert metrics[LearnerMetric.SCORE_MEAN] == pytest.approx(1.75 / 4)


def test_rejects_unscored_and_empty_batches(tiny_model: str, tmp_path) -> None:
    learner = _learner(tiny_model, tmp_path)
    with pytest.raises(RecordError, match="behaviour_logprobs"):
        learner.train_step([make_trajectory(uid="a", score=1.0)])
    with pytest.raises(ValueError, match="empty batch"):
        learner.train_step([])
    assert learner.version == 0


def test_warmup_schedule_and_weight_retention(tiny_model: str, tmp_path) -> None:
    cfg = AlgoConfig(mode="grpo", lr=1e-3, warmup_steps=4)
    learner = Learner(tiny_model, algo_cfg=cfg, trainer_cfg=TrainerConfig(micro_batch_size=8, checkpoint_interval=2),
                      run_dir=tmp_path, keep_weight_versions=2)
    lrs, due = [], []
    for step in range(5):
        lrs.append(learner.train_step(_scored_batch(tiny_model, seed=step))[LearnerMetric.LR])
        due.append(learner.checkpoint_due())
    assert lrs == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3])
    assert due == [False, True, False, True, False]
    assert list_weight_versions(tmp_path / "weights") == [4, 5]


def test_tied_embeddings_publish_loadable_weights(tiny_tied_model: str, tmp_path) -> None:
    learner = _learner(tiny_tied_model, tmp_path, mode="grpo")
    learner.train_step(_scored_batch(tiny_tied_model))
    fresh = load_policy(tiny_tied_model)
    load_weights_into(fresh, learner.latest_weights()[0])
    assert torch.equal(fresh.get_output_embeddings().weight, learner.model.get_output_embeddings().weight)
    assert torch.equal(fresh.get_input_embeddings().weight, learner.model.get_input_embeddings().weight)
