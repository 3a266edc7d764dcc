"""Rewards, GRPO advantages and token advantages: a worked group plus invariants.

The worked group (one prompt, G = 4, alpha = 0.5), written out by hand:

    traj  calls n  I (ΔH<0 per call)  m   F1     sparse r = F1*m/n
    0     0        -                  0   1/2    1/2  (n = 0 -> F1, no_tool_value="score")
    1     1        [1]                1   1      1
    2     2        [1, 0]             1   1      1/2
    3     3        [0, 0, 0]          0   2/3    0

Sparse: mean r = 1/2, deviations (0, 1/2, 0, -1/2), unbiased var = (1/4 + 1/4)/3 = 1/6,
std = 1/sqrt(6), A = dev * sqrt(6) = (0, sqrt(6)/2, 0, -sqrt(6)/2).

Dense per-call rewards F1 * (1 + 0.5 I):
    traj1: [1.5]   traj2: [1.5, 1.0]   traj3: [2/3, 2/3, 2/3]          (6 calls)
mean = (1.5 + 1.5 + 1 + 2) / 6 = 1, deviations (1/2, 1/2, 0, -1/3, -1/3, -1/3),
unbiased var = (1/4 + 1/4 + 0 + 3/9) / 5 = 1/6, std = 1/sqrt(6):
    A_tool = (sqrt6/2, sqrt6/2, 0, -sqrt6/3, -sqrt6/3, -sqrt6/3)
Outcome advantage from F1 = (12, 24, 24, 16)/24: mean 19/24, deviations (-7, 5, 5, -3)/24,
unbiased var = (49 + 25 + 25 + 9)/576/3 = 1/16, std = 1/4:
    A_out = (-7/6, 5/6, 5/6, -1/2)
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tepo_ray.algo import (
    compute_advantages,
    dense_rewards,
    grpo_advantages,
    sparse_rewards,
    token_advantages,
)

S6 = math.sqrt(6.0)
F1 = torch.tensor([0.5, 1.0, 1.0, 2 / 3])
NUM_CALLS = torch.tensor([0, 1, 2, 3])
CALL_MASK = torch.tensor([[0, 0, 0], [1, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.bool)
# padding entries set to True on purpose: they must be ignored
DECREASED = torch.tensor([[1, 1, 1], [1, 1, 1], [1, 0, 1], [0, 0, 0]], dtype=torch.bool)
GROUP = torch.tensor([5, 5, 5, 5])
T = 12
# Token layout (p = prompt, o = observation, . = padding; all loss_mask 0):
#   traj0: p p [answer 2..6) . . . . . .
#   traj1: p p [r1 2..5) o o [r2 7..10) . .
#   traj2: p p [r1 2..4) o [r2 5..7) o [r3 8..11) .
#   traj3: p [r1 1..3) o [r2 4..6) o [r3 7..9) o [r4 10..12)
TRAINED = {0: [(2, 6)], 1: [(2, 5), (7, 10)], 2: [(2, 4), (5, 7), (8, 11)], 3: [(1, 3), (4, 6), (7, 9), (10, 12)]}
CALL_SPANS = torch.tensor(
    [
        [[0, 0], [0, 0], [0, 0]],
        [[2, 5], [0, 0], [0, 0]],
        [[2, 4], [5, 7], [0, 0]],
        [[1, 3], [4, 6], [7, 9]],
    ]
)


def loss_mask() -> torch.Tensor:
    m = torch.zeros(4, T, dtype=torch.long)
    for b, spans in TRAINED.items():
        for s, e in spans:
            m[b, s:e] = 1
    return m


def row(*pieces: tuple[float, int]) -> list[float]:
    out: list[float] = []
    for value, n in pieces:
        out += [value] * n
    assert len(out) == T
    return out


# ----------------------------------------------------------------------------- rewards
def test_sparse_rewards_worked_group():
    m = (DECREASED & CALL_MASK).sum(-1)
    assert m.tolist() == [0, 1, 1, 0]
    r = sparse_rewards(F1, num_decreasing=m, num_calls=NUM_CALLS)
    assert r.tolist() == pytest.approx([0.5, 1.0, 0.5, 0.0])
    r_fixed = sparse_rewards(F1, num_decreasing=m, num_calls=NUM_CALLS, no_tool_value=-1)
    assert r_fixed.tolist() == pytest.approx([-1.0, 1.0, 0.5, 0.0])
    with pytest.raises(ValueError, match="num_decreasing <= num_calls"):
        sparse_rewards(F1, num_decreasing=torch.tensor([1, 1, 1, 0]), num_calls=NUM_CALLS)
    with pytest.raises(ValueError, match="no_tool_value"):
        sparse_rewards(F1, num_decreasing=m, num_calls=NUM_CALLS, no_tool_value="zero")


def test_dense_rewards_worked_group():
    r = dense_rewards(F1, decreased=DECREASED, call_mask=CALL_MASK, alpha=0.5)
    expected = [[0, 0, 0], [1.5, 0, 0], [1.5, 1.0, 0], [2 / 3, 2 / 3, 2 / 3]]
    torch.testing.assert_close(r, torch.tensor(expected))
    r0 = dense_rewards(F1, decreased=DECREASED, call_mask=CALL_MASK, alpha=0.0)
    torch.testing.assert_close(r0, F1[:, None] * CALL_MASK.float())


# ----------------------------------------------------------------------------- GRPO advantages
def test_grpo_advantages_worked_group_and_unbiased_std():
    r = torch.tensor([0.5, 1.0, 0.5, 0.0])
    adv = grpo_advantages(r, GROUP)
    assert adv.tolist() == pytest.approx([0.0, S6 / 2, 0.0, -S6 / 2], rel=1e-5)
    # the documented choice: unbiased std, same as torch.std
    assert adv.tolist() == pytest.approx(((r - r.mean()) / (r.std(unbiased=True) + 1e-6)).tolist())
    assert grpo_advantages(r, GROUP, std_normalize=False).tolist() == pytest.approx([0.0, 0.5, 0.0, -0.5])


def test_grpo_groups_are_independent_and_ids_arbitrary():
    # two interleaved groups with non-contiguous ids; group 3 is a constant group
    r = torch.tensor([0.5, 7.0, 1.0, 7.0, 0.5, 7.0, 0.0])
    g = torch.tensor([42, 3, 42, 3, 42, 3, 42])
    adv = grpo_advantages(r, g)
    assert adv[[1, 3, 5]].tolist() == [0.0, 0.0, 0.0]  # all-equal group
    assert adv[[0, 2, 4, 6]].tolist() == pytest.approx([0.0, S6 / 2, 0.0, -S6 / 2], rel=1e-5)


def test_grpo_singleton_group_and_mask():
    adv = grpo_advantages(torch.tensor([3.0, 1.0, 2.0]), torch.tensor([0, 1, 1]))
    assert adv[0] == 0.0 and not torch.isnan(adv).any()  # a group of one has no baseline spread
    r = torch.tensor([float("nan"), 1.0, 0.0, 5.0])
    mask = torch.tensor([False, True, True, False])
    adv = grpo_advantages(r, torch.zeros(4, dtype=torch.long), mask=mask)
    assert adv[0] == 0.0 and adv[3] == 0.0
    # r = (1, 0): mean 1/2, unbiased var (1/4 + 1/4)/1 = 1/2, A = ±(1/2)/sqrt(1/2) = ±sqrt(1/2)
    assert adv[1:3].tolist() == pytest.approx([math.sqrt(0.5), -math.sqrt(0.5)], rel=1e-5)
    with pytest.raises(ValueError, match="group_index"):
        grpo_advantages(torch.ones(3), torch.zeros(2, dtype=torch.long))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(-5, 5), st.integers(0, 4), st.booleans()), min_size=1, max_size=24))
def test_grpo_invariants(items):
    r = torch.tensor([x[0] for x in items], dtype=torch.float64)
    g = torch.tensor([x[1] for x in items])
    mask = torch.tensor([x[2] for x in items])
    adv = grpo_advantages(r, g, mask=mask, eps=1e-9)
    assert not torch.isnan(adv).any()
    assert (adv[~mask] == 0).all()
    for gid in g.unique():
        sel = (g == gid) & mask
        if sel.sum() < 2:
            assert (adv[sel] == 0).all()
            continue
        assert float(adv[sel].sum()) == pytest.approx(0.0, abs=1e-6)  # zero mean per group
        std = r[sel].std()
        if std > 1e-3:
            assert float(adv[sel].std()) == pytest.approx(1.0, rel=1e-5)  # unit unbiased std
            torch.testing.assert_close(adv[sel], (r[sel] - r[sel].mean()) / (std + 1e-9))


# ----------------------------------------------------------------------------- token advantages
def test_token_advantages_dense_worked_group():
    a, c = S6 / 2, -S6 / 3
    tool_adv = torch.tensor([[9.0, 9.0, 9.0], [a, 9.0, 9.0], [a, 0.0, 9.0], [c, c, c]])  # 9 = padding, ignored
    out_adv = torch.tensor([-7 / 6, 5 / 6, 5 / 6, -1 / 2])
    tok = token_advantages(
        loss_mask=loss_mask(), outcome_advantages=out_adv, tool_advantages=tool_adv,
        call_spans=CALL_SPANS, call_mask=CALL_MASK,
    )
    expected = [
        row((0, 2), (-7 / 6, 4), (0, 6)),
        row((0, 2), (a, 3), (0, 2), (5 / 6, 3), (0, 2)),
        row((0, 2), (a, 2), (0, 1), (0.0, 2), (0, 1), (5 / 6, 3), (0, 1)),
        row((0, 1), (c, 2), (0, 1), (c, 2), (0, 1), (c, 2), (0, 1), (-1 / 2, 2)),
    ]
    torch.testing.assert_close(tok, torch.tensor(expected))
    # sparse / GRPO: one advantage per trajectory on every trained token
    flat = token_advantages(loss_mask=loss_mask(), outcome_advantages=out_adv)
    torch.testing.assert_close(flat, out_adv[:, None] * loss_mask())


def test_token_advantages_rejects_overlapping_spans():
    with pytest.raises(ValueError, match="overlap"):
        token_advantages(
            loss_mask=torch.ones(1, 6), outcome_advantages=torch.zeros(1),
            tool_advantages=torch.ones(1, 2), call_spans=torch.tensor([[[0, 3], [2, 5]]]),
        )


# ----------------------------------------------------------------------------- the learner's entry point
@pytest.mark.parametrize("mode", ["grpo", "sparse", "dense"])
def test_compute_advantages_worked_group(mode):
    tok, rewards, metrics = compute_advantages(
        mode, scores=F1, group_index=GROUP, loss_mask=loss_mask(), num_calls=NUM_CALLS,
        decreased=DECREASED, call_mask=CALL_MASK, call_spans=CALL_SPANS, alpha=0.5,
    )
    lm = loss_mask().float()
    a_out = torch.tensor([-7 / 6, 5 / 6, 5 / 6, -1 / 2])
    if mode == "grpo":
        torch.testing.assert_close(rewards, F1)
        torch.testing.assert_close(tok, a_out[:, None] * lm, rtol=1e-5, atol=1e-5)
    elif mode == "sparse":
        torch.testing.assert_close(rewards, torch.tensor([0.5, 1.0, 0.5, 0.0]))
        torch.testing.assert_close(tok, torch.tensor([0, S6 / 2, 0, -S6 / 2])[:, None] * lm, rtol=1e-5, atol=1e-5)
    else:
        a, c = S6 / 2, -S6 / 3
        expected = [
            row((0, 2), (-7 / 6, 4), (0, 6)),
            row((0, 2), (a, 3), (0, 2), (5 / 6, 3), (0, 2)),
            row((0, 2), (a, 2), (0, 1), (0.0, 2), (0, 1), (5 / 6, 3), (0, 1)),
            row((0, 1), (c, 2), (0, 1), (c, 2), (0, 1), (c, 2), (0, 1), (-1 / 2, 2)),
        ]
        torch.testing.assert_close(tok, torch.tensor(expected), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rewards, F1)
        assert metrics["tool_reward_mean"] == pytest.approx(1.0)
    assert metrics["decreasing_fraction"] == pytest.approx(2 / 6)
    assert metrics["num_calls_mean"] == pytest.approx(1.5)


def test_compute_advantages_errors():
    with pytest.raises(ValueError, match=r"unknown reward function 'tepo'; valid names: \['dense', 'grpo', 'sparse'"):
        compute_advantages("tepo", scores=F1, group_index=GROUP, loss_mask=loss_mask())
    with pytest.raises(ValueError, match="disagrees with call_mask"):
        compute_advantages("sparse", scores=F1, group_index=GROUP, loss_mask=loss_mask(),
                           num_calls=torch.tensor([0, 1, 2, 2]), decreased=DECREASED, call_mask=CALL_MASK)
    with pytest.raises(ValueError, match="needs"):
        compute_advantages("dense", scores=F1, group_index=GROUP, loss_mask=loss_mask(), alpha=0.5)
