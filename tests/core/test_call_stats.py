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


def test_what_counts_as_malformed():
    assert ToolCall(tool="invalid", argument="", error="malformed").malformed
    assert ToolCall(tool="search", argument="q", error="unavailable").malformed  # no pool for that tool
    assert ToolCall(tool="python", argument="  \n").malformed  # empty call
    assert not ToolCall(tool="python", argument="print(1)", error="timeout").malformed  # ran, failed: not malformed


def test_reasoning_spans_must_lie_inside_their_segment():
    from tepo_ray.records import RecordError, Segment

    t = Trajectory(uid="s", group_id="g", prompt_id="p", token_ids=[1, 2, 3, 4], loss_mask=[0, 1, 1, 1],
                   versions=[-1, 0, 0, 0], prompt_len=1,
                   segments=[Segment(1, 4, None, reasoning_spans=[[2, 3]], nontag_spans=[[1, 4]])])
    t.validate()
    t.segments[0].reasoning_spans = [[3, 5]]
    with pytest.raises(RecordError, match=r"segments\[0\].reasoning_spans span \[3,5\)"):
        t.validate()


def test_summary_of_scored_eval_trajectories():
    from tepo_ray.evaluate import score_trajectories, summarize_trajectories

    def t(uid, answer, gold, kind, calls):
        tr = _traj(uid, calls)
        tr.answer, tr.gold, tr.task_type = answer, gold, kind
        return tr

    trajs = [t("q1", "Paris", ["Paris"], "qa", [_call(-0.1, tool="search")]),
             t("q2", "the city of Lyon", ["Lyon"], "qa", [_call(0.3, tool="search"), _call(None, malformed=True)]),
             t("m1", "56088", ["56088"], "math", [_call(-0.2)]),
             t("m2", None, ["3"], "math", [])]
    score_trajectories(trajs)
    s = summarize_trajectories(trajs)
    assert s["em"] == pytest.approx(0.5) and s["f1"] == pytest.approx((1.0 + 0.5) / 2)  # "city lyon" vs "lyon"
    assert s["accuracy"] == pytest.approx(2 / 4) and s["answered"] == pytest.approx(3 / 4)
    assert s["calls_per_question"] == pytest.approx(4 / 4) and s["correct_per_call"] == pytest.approx(2 / 4)
    assert s["delta_h_mean"] == pytest.approx(0.0) and s["delta_h_negative_share"] == pytest.approx(2 / 3)
    assert s["malformed_per_question"] == pytest.approx(1 / 4)
