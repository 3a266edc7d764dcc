"""Arithmetic items and SFT demonstrations: some demonstrations waste a call, hard items always keep theirs."""

from __future__ import annotations

import collections

from tepo_ray.data.tasks import REDUNDANT_SHARE, arithmetic_items, demonstration, redundancy_kind


def _text(pieces) -> str:
    return "".join(t for t, _ in pieces)


def test_redundant_demonstrations_have_the_configured_shares_and_are_stable() -> None:
    items = arithmetic_items(n=4000, seed=3)
    kinds = collections.Counter(redundancy_kind(it) for it in items)
    hard = sum(it["needs_tool"] for it in items)
    easy = len(items) - hard
    assert abs(kinds["repeat"] / hard - REDUNDANT_SHARE["repeat"]) < 0.03
    assert abs(kinds["fail_first"] / hard - REDUNDANT_SHARE["fail_first"]) < 0.03
    assert abs(kinds["easy_call"] / easy - REDUNDANT_SHARE["easy_call"]) < 0.05
    assert [redundancy_kind(it) for it in items[:50]] == [redundancy_kind(it) for it in arithmetic_items(n=50, seed=3)]


def test_demonstrations_waste_calls_but_hard_items_keep_the_needed_one() -> None:
    def run_python(code: str) -> str:
        try:
            return f"{eval(code.removeprefix('print(')[:-1])}\n"  # noqa: S307 - a fixed arithmetic snippet
        except SyntaxError:
            return "SyntaxError: '(' was never closed\n"

    seen = collections.Counter()
    for it in arithmetic_items(n=400, seed=0):
        pieces = demonstration(it, run_python=run_python)
        text = _text(pieces)
        kind = redundancy_kind(it)
        seen[kind] += 1
        calls = text.count("<python>")
        assert text.endswith(f"<answer>{it['answers'][0]}</answer>")
        assert all(not trainable for t, trainable in pieces if t.startswith("<result>"))  # observations masked
        if it["needs_tool"]:
            assert f"<result>{it['answers'][0]}\n</result>" in text  # the needed call is always made
            assert calls == (2 if kind in ("repeat", "fail_first") else 1)
        else:
            assert calls == (1 if kind == "easy_call" else 0)
    assert {"repeat", "fail_first", "easy_call", None} <= set(seen)
