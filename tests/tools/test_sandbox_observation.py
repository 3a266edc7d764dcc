"""format_observation and the bounded output capture (pure functions; no process is started here)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tepo_ray.tools import sandbox_worker
from tepo_ray.tools.python_sandbox import (
    TRUNCATION_MARKER,
    SandboxErrorKind,
    SandboxResult,
    _decode_stream,
    _error_note,
    format_observation,
)


def _res(stdout: str = "", stderr: str = "", *, error=None, exit_code=0, duration_s=0.01) -> SandboxResult:
    return SandboxResult(stdout=stdout, stderr=stderr, exit_code=exit_code, timed_out=error == "timeout",
                         truncated=False, duration_s=duration_s, error=error)


# ------------------------------------------------------------------------------------------------ worked examples
def test_worked_examples():
    assert format_observation(_res("56088\n"), max_chars=400) == "56088\n"
    assert format_observation(_res(), max_chars=400) == "[no output]"
    tb = "Traceback (most recent call last):\n  File \"<code>\", line 1, in <module>\nZeroDivisionError: x\n"
    assert format_observation(_res("a\n", tb, error=SandboxErrorKind.EXCEPTION, exit_code=1), max_chars=400) \
        == "a\n" + tb
    assert format_observation(_res("partial", error=SandboxErrorKind.TIMEOUT, exit_code=None, duration_s=2.0),
                              max_chars=400) == "partial\n[error: timeout, execution stopped after 2.0 s]"
    assert format_observation(_res(error=SandboxErrorKind.NONZERO_EXIT, exit_code=3), max_chars=400) \
        == "[exit code 3]"
    assert format_observation(_res(error=SandboxErrorKind.CRASHED, exit_code=-11), max_chars=400) \
        == "[error: crashed, process killed by SIGSEGV]"
    assert format_observation(_res("out", "err"), max_chars=400) == "out\nerr"


def test_truncation_keeps_head_tail_and_note():
    obs = format_observation(_res("H" * 500 + "T" * 500, error=SandboxErrorKind.TIMEOUT, exit_code=None,
                                  duration_s=1.0), max_chars=120)
    note = "[error: timeout, execution stopped after 1.0 s]"
    assert len(obs) == 120 and obs.endswith("\n" + note)
    body = obs[: -len(note) - 1]
    head, tail = body.split(TRUNCATION_MARKER)
    assert set(head) == {"H"} and set(tail) == {"T"} and abs(len(head) - len(tail)) <= 1


def test_tiny_and_invalid_budgets():
    assert len(format_observation(_res("x" * 100, error=SandboxErrorKind.MEMORY), max_chars=5)) <= 5
    with pytest.raises(ValueError, match="max_chars"):
        format_observation(_res("x"), max_chars=0)


_errors = st.sampled_from([None, *SandboxErrorKind])


@settings(max_examples=300, deadline=None)
@given(stdout=st.text(max_size=300), stderr=st.text(max_size=300), error=_errors,
       exit_code=st.one_of(st.none(), st.integers(-64, 255)), max_chars=st.integers(1, 400))
def test_observation_is_bounded_and_exact_when_it_fits(stdout, stderr, error, exit_code, max_chars):
    res = SandboxResult(stdout=stdout, stderr=stderr, exit_code=exit_code, timed_out=False, truncated=False,
                        duration_s=0.5, error=error)
    obs = format_observation(res, max_chars=max_chars)
    assert 1 <= len(obs) <= max_chars
    full = format_observation(res, max_chars=10 ** 6)
    note = _error_note(res)
    if len(full) <= max_chars:
        assert obs == full
    elif max_chars >= len(note) + len(TRUNCATION_MARKER) + 3:  # room for head, marker, tail and the note
        assert TRUNCATION_MARKER in obs and obs.endswith(note)
    assert stdout in full and stderr in full  # nothing is dropped when it fits


# ------------------------------------------------------------------------------------------------ capture + decode
def _capture(data: bytes, keep: int, chunk: int) -> sandbox_worker._Capture:
    cap = sandbox_worker._Capture(keep)
    for i in range(0, len(data), chunk):
        cap.add(data[i:i + chunk])
    return cap


def test_decode_drops_cut_multibyte_sequences():
    text, cut = _decode_stream(b"ab\xc3", b"\xa9cd", total=100, max_chars=50)
    assert cut and text == "ab" + TRUNCATION_MARKER + "cd"
    assert _decode_stream("é€😀".encode(), b"", total=9, max_chars=10) == ("é€😀", False)


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=400), keep=st.integers(4, 200), chunk=st.integers(1, 64),
       max_chars=st.integers(1, 100))
def test_capture_then_decode_keeps_a_prefix_and_a_suffix(text, keep, chunk, max_chars):
    data = text.encode("utf-8")
    cap = _capture(data, keep, chunk)
    assert cap.total == len(data) and len(cap.head) + len(cap.tail) <= keep  # bounded memory
    out, cut = _decode_stream(bytes(cap.head), bytes(cap.tail), cap.total, max_chars)
    if len(data) <= keep and len(text) <= max_chars:
        assert (out, cut) == (text, False)
    else:
        assert cut
        head, tail = out.split(TRUNCATION_MARKER, 1) if TRUNCATION_MARKER not in text else (None, None)
        if head is not None:
            assert text.startswith(head) and text.endswith(tail)
            assert len(head) + len(tail) <= max_chars


def test_capture_keeps_exact_head_and_tail_bytes():
    data = bytes(range(256)) * 10
    cap = _capture(data, keep=100, chunk=37)
    assert bytes(cap.head) == data[:50] and bytes(cap.tail) == data[-50:] and cap.total == len(data)
