"""Outcome scores ``F1(x, y_i)`` (DESIGN.md section 1, "Outcome score").

* ``qa``: SQuAD / HotpotQA token F1 after answer normalisation (lowercase, drop
  punctuation, drop the articles a/an/the, collapse whitespace), max over gold
  aliases. HotpotQA rule: if either normalised side is ``yes`` / ``no`` /
  ``noanswer`` and the two differ, the score is 0.
* ``em``: exact match of the normalised strings, max over aliases.
* ``math``: 1/0 mathematical equivalence with ``math_verify`` (parse + verify).
"""

from __future__ import annotations

import enum
import json
import logging
import os
import re
import select
import string
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

__all__ = [
    "TaskType",
    "normalize_answer",
    "f1_score",
    "exact_match",
    "math_equal",
    "outcome_scores",
]

_ARTICLES = re.compile(r"\b(a|an|the)\b", flags=re.UNICODE)
_PUNCT = frozenset(string.punctuation)
_YES_NO = ("yes", "no", "noanswer")


class TaskType(str, enum.Enum):
    """How a trajectory's final answer is scored (``Trajectory.task_type``)."""

    QA = "qa"  # token F1
    EM = "em"  # exact match
    MATH = "math"  # math_verify equivalence


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lowercase, remove punctuation, articles, extra whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _golds(golds: str | Sequence[str]) -> list[str]:
    if isinstance(golds, str):
        return [golds]
    out = list(golds)
    if not out:
        raise ValueError("golds is empty: expected a gold answer string or a non-empty list of aliases")
    for g in out:
        if not isinstance(g, str):
            raise ValueError(f"gold answers must be strings, got {type(g).__name__}: {g!r}")
    return out


def _f1_single(prediction: str, gold: str) -> float:
    pred_n, gold_n = normalize_answer(prediction), normalize_answer(gold)
    if (pred_n in _YES_NO or gold_n in _YES_NO) and pred_n != gold_n:
        return 0.0
    pred_toks, gold_toks = pred_n.split(), gold_n.split()
    if not pred_toks or not gold_toks:
        # SQuAD v2 convention: both empty -> 1, one empty -> 0.
        return float(pred_toks == gold_toks)
    common = Counter(pred_toks) & Counter(gold_toks)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_toks)
    recall = num_same / len(gold_toks)
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str | None, golds: str | Sequence[str]) -> float:
    """Token F1 (SQuAD / HotpotQA), max over gold aliases; ``None`` prediction -> 0."""
    aliases = _golds(golds)
    if prediction is None:
        return 0.0
    return max(_f1_single(prediction, g) for g in aliases)


def exact_match(prediction: str | None, golds: str | Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised gold alias, else 0.0."""
    aliases = _golds(golds)
    if prediction is None:
        return 0.0
    pred_n = normalize_answer(prediction)
    return float(any(pred_n == normalize_answer(g) for g in aliases))


# ----------------------------------------------------------------------------- math
MATH_TIMEOUT_S = 5  # math_verify's per-operation timeout (signal based, main thread only)
MATH_WORKER_TIMEOUT_S = 20.0  # wall-clock limit of one math_equal in the worker process
_MATH_MAX_CHARS = 1000


def math_equal(prediction: str | None, gold: str, *, max_chars: int = _MATH_MAX_CHARS) -> float:
    """1.0 if ``prediction`` is mathematically equal to ``gold`` (math_verify), else 0.0.

    Both sides are parsed as LaTeX: a string without ``$`` or ``\\boxed`` is wrapped
    in ``$…$`` (so ``\\frac12``, ``1+x``, ``(1, 2)`` parse as written rather than as
    the last number in them). If the wrapped form yields no math object, the text is
    parsed as-is (math_verify's plain-expression extraction); text with Python's
    ``**`` is parsed as-is first. Never raises on garbage: unparseable input, and
    predictions longer than ``max_chars``, score 0.

    Never hangs: math_verify bounds sympy with ``signal.alarm``, which only works in
    the main thread. There it is used as is (``MATH_TIMEOUT_S`` per operation). From
    any other thread (threaded or async Ray actors, thread pools) the comparison runs
    in a helper process (``python -m tepo_ray.algo.scoring``, started once, main thread
    there) and is abandoned, scoring 0, after ``MATH_WORKER_TIMEOUT_S``; a stuck helper
    is killed and restarted. Inputs like ``10^{10^{10^{10}}}`` otherwise block a
    thread, and the GIL, for good.
    """
    if not isinstance(gold, str):
        raise ValueError(f"gold must be a string, got {type(gold).__name__}: {gold!r}")
    if prediction is None or not prediction.strip() or len(prediction) > max_chars:
        return 0.0
    if threading.current_thread() is not threading.main_thread():
        return _MATH_WORKER.call(prediction, gold)
    return _math_equal_here(prediction, gold)


def _math_equal_here(prediction: str, gold: str) -> float:
    """math_equal in this (main) thread with math_verify's signal timeouts."""
    try:
        gold_parsed = _parse_math(gold)
        pred_parsed = _parse_math(prediction)
        if not gold_parsed or not pred_parsed:
            return 0.0
        from math_verify import verify

        return float(bool(verify(gold_parsed, pred_parsed, timeout_seconds=MATH_TIMEOUT_S)))
    except Exception:  # math_verify/sympy failure on odd input: not equal
        return 0.0


def _parse_math(text: str) -> list:
    """math_verify parse of ``text``; prefers the LaTeX-wrapped reading (see math_equal)."""
    from math_verify import parse  # heavy import (sympy), done on first use

    logging.getLogger("math_verify").setLevel(logging.ERROR)
    text = text.strip()
    if "$" in text or "\\boxed" in text:
        forms = [text]
    elif "**" in text:  # Python power: LaTeX would read ``2**0.5`` as ``2``
        forms = [text, f"${text}$"]
    else:
        forms = [f"${text}$", text]
    first_nonempty: list = []
    for form in forms:
        parsed = parse(form, parsing_timeout=MATH_TIMEOUT_S)
        if any(not isinstance(p, str) for p in parsed):
            return parsed
        first_nonempty = first_nonempty or parsed
    return first_nonempty


class _MathWorker:
    """One helper process answering math_equal requests (JSON lines) from non-main threads.

    Requests are serialised by a lock. The process is started on first use and
    replaced after a timeout or a crash, so one pathological answer costs at most
    ``MATH_WORKER_TIMEOUT_S`` and never blocks later calls.
    """

    STARTUP_TIMEOUT_S = 120.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None

    def _start(self) -> subprocess.Popen:
        pkg_root = str(Path(__file__).resolve().parents[2])  # dir holding tepo_ray/, for uninstalled checkouts
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_root, env.get("PYTHONPATH")) if p)
        proc = subprocess.Popen(
            [sys.executable, "-m", "tepo_ray.algo.scoring"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            text=True, bufsize=1, env=env,
        )
        if self._read(proc, self.STARTUP_TIMEOUT_S) != "ready":
            self._kill(proc)
            raise RuntimeError("math_equal helper process failed to start (python -m tepo_ray.algo.scoring)")
        return proc

    @staticmethod
    def _read(proc: subprocess.Popen, timeout: float) -> str | None:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        if not ready:
            return None
        line = proc.stdout.readline()
        return line.strip() if line else None

    @staticmethod
    def _kill(proc: subprocess.Popen) -> None:
        proc.kill()
        proc.wait()
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()

    def call(self, prediction: str, gold: str) -> float:
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._proc = self._start()
            proc = self._proc
            try:
                assert proc.stdin is not None
                proc.stdin.write(json.dumps([prediction, gold]) + "\n")
                proc.stdin.flush()
                reply = self._read(proc, MATH_WORKER_TIMEOUT_S)
            except (BrokenPipeError, OSError, ValueError):
                reply = None
            if reply is None:  # timed out or died: replace the process, score 0
                self._kill(proc)
                self._proc = None
                return 0.0
            return float(reply)


_MATH_WORKER = _MathWorker()


def _serve_math() -> None:
    """Helper process loop: one JSON ``[prediction, gold]`` per line in, one score per line out."""
    print("ready", flush=True)
    for line in sys.stdin:
        prediction, gold = json.loads(line)
        print(_math_equal_here(prediction, gold), flush=True)


# ----------------------------------------------------------------------------- batch
def _score_math(prediction: str | None, golds: str | Sequence[str]) -> float:
    return max(math_equal(prediction, g) for g in _golds(golds))


_SCORERS = {
    TaskType.QA.value: f1_score,
    TaskType.EM.value: exact_match,
    TaskType.MATH.value: _score_math,
}


def outcome_scores(
    predictions: Sequence[str | None],
    golds: Sequence[str | Sequence[str]],
    *,
    task_types: str | Sequence[str],
) -> Tensor:
    """Score a batch of final answers.

    Args:
        predictions: ``B`` answers (None = no answer -> 0).
        golds: ``B`` gold aliases lists (a bare string is one alias).
        task_types: ``B`` names from :class:`TaskType` (``qa`` / ``em`` / ``math``),
            or one name for the whole batch.

    Returns:
        ``[B]`` float32 scores in [0, 1].
    """
    if isinstance(task_types, str):
        task_types = [task_types] * len(predictions)
    if not (len(predictions) == len(golds) == len(task_types)):
        raise ValueError(
            f"predictions ({len(predictions)}), golds ({len(golds)}) and task_types ({len(task_types)}) "
            "must have the same length"
        )
    out = []
    for i, (pred, gold, kind) in enumerate(zip(predictions, golds, task_types)):
        key = kind.value if isinstance(kind, TaskType) else kind
        if key not in _SCORERS:
            raise ValueError(f"task_types[{i}]={kind!r} is unknown; expected one of {sorted(_SCORERS)}")
        out.append(_SCORERS[key](pred, gold))
    return torch.tensor(out, dtype=torch.float32)


if __name__ == "__main__":
    _serve_math()
