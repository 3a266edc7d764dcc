"""Malformed tool calls: excluded from m/n and dense per-call rewards, or penalised; never an α bonus."""

from __future__ import annotations

import pytest
import torch

from tepo_ray.algo import apply_malformed_policy, compute_advantages


def _group():
    """One group of two trajectories, two call slots each.

    traj 0: F1 = 1, call 0 well-formed with ΔH < 0, call 1 malformed (its I would be True: must not count).
    traj 1: F1 = 1, one well-formed call with ΔH >= 0.
    """
    scores = torch.tensor([1.0, 1.0])
    call_mask = torch.tensor([[True, True], [True, False]])
    decreased = torch.tensor([[True, True], [False, False]])
    malformed = torch.tensor([[False, True], [False, False]])
    spans = torch.tensor([[[1, 3], [3, 5]], [[1, 3], [0, 0]]])
    loss_mask = torch.tensor([[0, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 0]])
    return dict(scores=scores, group_index=torch.tensor([0, 0]), loss_mask=loss_mask, call_mask=call_mask,
                decreased=decreased, call_spans=spans, malformed=malformed)


def test_policy_masks():
    g = _group()
    mask, dec, pen = apply_malformed_policy("exclude", call_mask=g["call_mask"], decreased=g["decreased"],
                                            malformed=g["malformed"])
    assert mask.tolist() == [[True, False], [True, False]] and not pen.any()
    assert dec.tolist() == [[True, False], [False, False]]
    mask, dec, pen = apply_malformed_policy("penalize", call_mask=g["call_mask"], decreased=g["decreased"],
                                            malformed=g["malformed"])
    assert mask.tolist() == g["call_mask"].tolist() and pen.tolist() == [[False, True], [False, False]]
    assert dec.tolist() == [[True, False], [False, False]]
    with pytest.raises(ValueError, match="exclude"):
        apply_malformed_policy("ignore", call_mask=mask, decreased=dec, malformed=pen)


def test_sparse_exclude_counts_only_well_formed_calls():
    _, r, m = compute_advantages("sparse", **_group(), malformed_calls="exclude")
    # traj 0: m/n = 1/1 (the malformed call is not a call), traj 1: 0/1
    assert r.tolist() == pytest.approx([1.0, 0.0])
    assert m["decreasing_fraction"] == pytest.approx(1 / 2) and m["malformed_calls"] == 1.0


def test_sparse_penalize_counts_the_malformed_call_as_unhelpful():
    _, r, m = compute_advantages("sparse", **_group(), malformed_calls="penalize")
    assert r.tolist() == pytest.approx([0.5, 0.0])  # traj 0: m/n = 1/2
    assert m["decreasing_fraction"] == pytest.approx(1 / 3)


@pytest.mark.parametrize("policy", ["exclude", "penalize"])
def test_dense_worked_example(policy):
    alpha = 0.5
    adv, _, m = compute_advantages("dense", **_group(), malformed_calls=policy, alpha=alpha)
    # exclude: tool rewards [1.5 (traj0 call0), 1.0 (traj1 call0)] -> A = ±1/std = ±0.7071 (unbiased std);
    # the malformed call's tokens (3, 4) get the outcome advantage (equal F1 -> 0).
    # penalize: rewards [1.5, 0, 1.0]: mean 0.8333, std 0.7638 -> A = [0.873, -1.091, 0.218].
    if policy == "exclude":
        a0, a1 = 0.5 / (0.5**0.5), -0.5 / (0.5**0.5)
        assert adv[0].tolist() == pytest.approx([0, a0, a0, 0, 0, 0], abs=1e-4)
        assert adv[1].tolist() == pytest.approx([0, a1, a1, 0, 0, 0], abs=1e-4)
        assert m["tool_reward_mean"] == pytest.approx(1.25)
    else:
        r = torch.tensor([1.5, 0.0, 1.0], dtype=torch.float64)
        a = ((r - r.mean()) / r.std()).tolist()
        assert adv[0].tolist() == pytest.approx([0, a[0], a[0], a[1], a[1], 0], abs=1e-4)
        assert adv[1].tolist() == pytest.approx([0, a[2], a[2], 0, 0, 0], abs=1e-4)
        assert a[1] < 0  # the malformed call is pushed down


def test_malformed_call_never_earns_the_alpha_bonus_even_if_its_entropy_dropped():
    g = _group()
    g["malformed"] = torch.tensor([[True, False], [False, False]])  # now the I=True call 0 of traj 0 is bad
    _, r, m = compute_advantages("sparse", **g, malformed_calls="penalize")
    assert r[0].item() == pytest.approx(0.5)  # only call 1 (I=True, well-formed) counts as decreasing


def test_equal_tool_rewards_give_zero_tool_advantages():
    g = _group()
    g["malformed"] = torch.zeros(2, 2, dtype=torch.bool)
    g["decreased"] = torch.zeros(2, 2, dtype=torch.bool)
    adv, _, _ = compute_advantages("dense", **g, alpha=1.0)
    assert adv.abs().max().item() == 0.0


def test_learner_inputs_mark_malformed_calls():
    from tepo_ray.records import Segment, ToolCall, Trajectory
    from tepo_ray.trainer.learner import build_advantage_inputs

    t = Trajectory(uid="a", group_id="g", prompt_id="p", token_ids=[1] * 8, loss_mask=[0, 1, 1, 0, 1, 1, 0, 1],
                   versions=[0] * 8, prompt_len=1,
                   segments=[Segment(1, 3, 0), Segment(4, 6, 1), Segment(7, 8, None)],
                   tool_calls=[ToolCall(tool="python", argument="1", segment_index=0, entropy_decreased=True),
                               ToolCall(tool="invalid", argument="", error="malformed", segment_index=1)])
    inputs = build_advantage_inputs([t])
    assert inputs.malformed.tolist() == [[False, True]] and inputs.call_mask.tolist() == [[True, True]]


def test_equal_rewards_give_exactly_zero_even_when_their_float_mean_is_off_by_an_ulp():
    from tepo_ray.algo import grpo_advantages

    r = torch.full((3,), 2.8127893726983553, dtype=torch.float64)  # mean(r) != r[0] in float64
    assert grpo_advantages(r, torch.zeros(3, dtype=torch.long), eps=1e-9).abs().max().item() == 0.0
