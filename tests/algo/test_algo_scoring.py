"""Outcome scores: SQuAD/HotpotQA F1, exact match, math equivalence."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from tepo_ray.algo import exact_match, f1_score, math_equal, outcome_scores, scoring


@pytest.mark.parametrize(
    "prediction, golds, expected",
    [
        ("The Eiffel Tower!", "eiffel tower", 1.0),  # case, article, punctuation
        ("  eiffel\t  tower ", "Eiffel Tower", 1.0),  # whitespace
        ("Eiffel", "the Eiffel Tower", 2 * (1 * 0.5) / 1.5),  # P=1, R=1/2
        ("an apple pie", "apple", 2 * (0.5 * 1) / 1.5),  # "an" dropped: P=1/2, R=1
        ("Paris, France", ["London", "Paris"], 2 * (0.5 * 1) / 1.5),  # max over aliases
        ("NYC", ["New York City", "nyc"], 1.0),
        ("a a b", "a b b", 2 / 3),  # articles removed: "b" vs "b b" -> P=1, R=1/2
        ("cat cat dog", "cat dog dog", 2 / 3),  # Counter overlap: cat 1 + dog 1 = 2 of 3
        ("yes", "no", 0.0),
        ("yes it is", "yes", 0.0),  # HotpotQA: gold yes/no and different normalised strings
        ("no", "No.", 1.0),
        ("noanswer", "answer", 0.0),
        (None, "Paris", 0.0),
        ("", "Paris", 0.0),
        ("Paris", "London", 0.0),
    ],
)
def test_f1_cases(prediction, golds, expected):
    assert f1_score(prediction, golds) == pytest.approx(expected)


def test_exact_match_and_errors():
    assert exact_match("The  Cat.", "cat") == 1.0
    assert exact_match("black cat", ["cat", "Black-cat"]) == 0.0  # hyphen is removed, not split
    assert exact_match("blackcat", ["cat", "Black-cat"]) == 1.0
    assert exact_match(None, "cat") == 0.0
    with pytest.raises(ValueError, match="golds is empty"):
        f1_score("x", [])
    with pytest.raises(ValueError, match="strings"):
        exact_match("x", [3])


@pytest.mark.parametrize(
    "prediction, gold, expected",
    [
        ("1/2", "0.5", 1.0),
        ("0.5", "\\frac{1}{2}", 1.0),
        ("\\frac{1}{2}", "1/2", 1.0),
        ("\\frac12", "0.5", 1.0),
        ("\\boxed{5}", "5", 1.0),
        ("3.0", "3", 1.0),
        ("1+x", "x+1", 1.0),
        ("1+x", "1", 0.0),  # not the first number in it
        ("2**3", "8", 1.0),
        ("2**0.5", "2", 0.0),
        ("0.51", "1/2", 0.0),
        ("4", "5", 0.0),
        ("garbage ###", "2", 0.0),
        ("}{", "2", 0.0),
        ("\\frac{", "2", 0.0),
        ("", "2", 0.0),
        (None, "2", 0.0),
        ("9" * 5000, "1", 0.0),  # over max_chars: rejected without parsing
    ],
)
def test_math_equal(prediction, gold, expected):
    assert math_equal(prediction, gold) == expected


def _in_thread(fn, timeout=120.0):
    box: dict[str, object] = {}

    def work():
        try:
            box["value"] = fn()
        except Exception as exc:  # pragma: no cover - reported below
            box["error"] = exc

    t = threading.Thread(target=work, daemon=True)
    t0 = time.monotonic()
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "math_equal hung in a worker thread"
    assert "error" not in box, box.get("error")
    return box["value"], time.monotonic() - t0


def test_math_equal_off_the_main_thread_never_hangs(monkeypatch):
    """math_verify's signal timeout only works in the main thread; Ray actor threads must still score,
    and a pathological answer (a 10^10^10^10 power tower blocks a thread and the GIL) costs bounded time."""
    value, _ = _in_thread(lambda: [math_equal("1/2", "0.5"), math_equal("3", "4"), math_equal("}{", "4")])
    assert value == [1.0, 0.0, 0.0]
    monkeypatch.setattr(scoring, "MATH_WORKER_TIMEOUT_S", 1.0)
    value, elapsed = _in_thread(lambda: math_equal("10^{10^{10^{10}}}", "1"))
    assert value == 0.0 and elapsed < 10.0
    value, _ = _in_thread(lambda: math_equal("\\frac{2}{4}", "0.5"))  # the helper was replaced and still works
    assert value == 1.0


def test_outcome_scores_dispatch_by_task_type():
    scores = outcome_scores(
        ["the Eiffel", "1/2", "Paris!", None],
        [["Eiffel Tower"], ["0.5"], ["paris"], ["x"]],
        task_types=["qa", "math", "em", "qa"],
    )
    assert scores.dtype == torch.float32
    assert scores.tolist() == pytest.approx([2 / 3, 1.0, 1.0, 0.0])
    assert outcome_scores(["c b", "A b"], [["b"], ["b"]], task_types="em").tolist() == [0.0, 1.0]
    msg = r"task_types\[1\]='poetry' is unknown; expected one of \['em', 'math', 'qa'\]"
    with pytest.raises(ValueError, match=msg):
        outcome_scores(["a", "b"], [["a"], ["b"]], task_types=["qa", "poetry"])
    with pytest.raises(ValueError, match="same length"):
        outcome_scores(["a"], [["a"], ["b"]], task_types=["qa", "qa"])
