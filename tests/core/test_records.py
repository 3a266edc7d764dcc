"""Trajectory records: JSONL round trip and boundary validation."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tepo_ray.records import RecordError, Segment, ToolCall, Trajectory, read_jsonl, write_jsonl


def _traj(**kw):
    # prompt(3) r1(4, ends with call 0) obs(3) r2(2)
    base = dict(
        uid="t0",
        group_id="g0",
        prompt_id="p0",
        token_ids=list(range(12)),
        loss_mask=[0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 1, 1],
        versions=[-1, -1, -1, 3, 3, 3, 3, -1, -1, -1, 4, 4],
        prompt_len=3,
        segments=[Segment(3, 7, 0), Segment(10, 12, None)],
        tool_calls=[ToolCall("python", "print(1)", "1", None, 0.01, 0)],
        answer="1",
        gold=["1"],
    )
    base.update(kw)
    return Trajectory(**base)


def test_round_trip(tmp_path):
    t = _traj(entropies=[0.0] * 12, behaviour_logprobs=[-0.5] * 12, meta={"x": [1, 2]})
    path = tmp_path / "t.jsonl"
    write_jsonl(path, [t, _traj(uid="t1")])
    back = list(read_jsonl(path))
    assert back[0] == t and back[1].uid == "t1"
    assert back[0].behaviour_version == 3 and back[0].num_calls == 1


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (dict(loss_mask=[0] * 11), "loss_mask"),
        (dict(versions=[0] * 3), "versions"),
        (dict(loss_mask=[1] + [0] * 11), "prompt"),
        (dict(segments=[Segment(3, 8, 0), Segment(10, 12, None)]), "segments[0]"),
        (dict(finish_reason="done"), "finish_reason"),
        (dict(tool_calls=[ToolCall("python", "x", segment_index=1)]), "does not point back"),
        (dict(entropies=[float("nan")] * 12), "non-finite"),
    ],
)
def test_validate_names_field(change, needle):
    with pytest.raises(RecordError, match=None) as err:
        _traj(**change).validate()
    assert needle in str(err.value)


def test_bad_jsonl_line_names_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    write_jsonl(path, [_traj()])
    with open(path, "a") as fh:
        fh.write("{not json\n")
    it = read_jsonl(path)
    next(it)
    with pytest.raises(RecordError, match=r"bad.jsonl:2"):
        next(it)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(allow_nan=False, allow_infinity=False, width=32), min_size=12, max_size=12), st.text())
def test_round_trip_property(vals, answer):
    t = _traj(entropies=vals, answer=answer)
    assert Trajectory.from_json(t.to_json()) == t
