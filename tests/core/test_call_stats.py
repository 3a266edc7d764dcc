"""call_stats: the one definition of m/n, mean ΔH and malformed-call counts (driver, learner, eval)."""

from __future__ import annotations

import pytest

from tepo_ray.metrics import call_stats
from tepo_ray.records import ToolCall, Trajectory


def _traj(uid: str, calls: list[ToolCall]) -> Trajectory:
    return Trajectory(uid=uid, group_id="g", prompt_id="p", token_ids=[1], loss_mask=[0], versions=[-1],
                      prompt_len=1, tool_calls=calls)


def _call(dh: float | None, *, tool: str = "python", malformed: bool = False) -> ToolCall:
    if malformed:
        return ToolCall(tool="invalid", argument="", error="malformed", delta_entropy=None, entropy_decreased=False)
    return ToolCall(tool=tool, argument="x", delta_entropy=dh, entropy_decreased=dh is not None and dh < 0)


def test_worked_batch():
    trajs = [
        _traj("a", [_call(-0.5), _call(None, malformed=True)]),
        _traj("b", [_call(0.25, tool="search"), _call(-0.25, tool="search"), _call(None)]),  # last: cut after
        _traj("c", []),
    ]
    cs = call_stats(trajs, malformed_calls="exclude")
    assert cs["calls_per_traj"] == pytest.approx(5 / 3)
    assert cs["malformed_per_traj"] == pytest.approx(1 / 3) and cs["malformed_fraction"] == pytest.approx(1 / 5)
    assert cs["m_over_n"] == pytest.approx((1 / 1 + 1 / 3) / 2)  # a: 1 of 1 well-formed; b: 1 of 3
    assert cs["delta_h_mean"] == pytest.approx((-0.5 + 0.25 - 0.25) / 3)
    assert cs["decrease_fraction"] == pytest.approx(2 / 3)
    assert cs["delta_h_by_tool"] == pytest.approx({"python": -0.5, "search": 0.0})
    pen = call_stats(trajs, malformed_calls="penalize")
    assert pen["m_over_n"] == pytest.approx((1 / 2 + 1 / 3) / 2)


def test_empty_batch_has_no_ratios():
    cs = call_stats([_traj("a", [])])
    assert cs["m_over_n"] is None and cs["delta_h_mean"] is None and cs["calls_per_traj"] == 0.0
