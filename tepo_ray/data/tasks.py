"""Prompts and tool-use demonstrations.

Task items are dicts ``{"id", "question", "answers": [aliases], "task_type"}``
(`task_type` "math" -> equivalence scoring, "qa" -> token F1). Sources:

* `arithmetic`: 3-digit x 3-digit products a tiny model cannot do in its head
  (the Python tool is needed), mixed with one-digit sums answered directly, so the
  policy also learns when *not* to call a tool (what TEPO-sparse rewards).
* `multihop`: questions over the generated wiki-18-style corpus
  (`tepo_ray.data.corpus`), needing one or two searches.
* `jsonl`: a user file with the same fields; a bad line raises naming file and line.

`demonstration(item)` gives a tool-use demonstration as (text, trainable) pieces
for SFT; `render_prompt(question)` is the single prompt format used everywhere.

Demonstrations are deliberately imperfect, so that RL has something to fix in
both directions (what a TEPO vs GRPO comparison needs): a seeded share of them
(`REDUNDANT_SHARE`, chosen per item id) makes a redundant or useless call — the
same call repeated, a failing call before the right one, a call on an easy sum,
a search for the wrong entity first — while hard items always keep the call
they need, so dropping every call costs accuracy.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

__all__ = [
    "TaskError",
    "render_prompt",
    "arithmetic_items",
    "load_jsonl_items",
    "make_items",
    "demonstration",
    "Piece",
    "REDUNDANT_SHARE",
    "redundancy_kind",
]

Piece = tuple[str, bool]  # (text, trainable)
DEMO_VERSION = 3  # bump when demonstration text changes (part of the SFT cache key)


# Share of demonstrations that waste a call, per kind (chosen by a seeded draw on the item id).
REDUNDANT_SHARE = {"repeat": 0.15, "fail_first": 0.1, "easy_call": 0.3, "wrong_entity": 0.2}


def redundancy_kind(item: dict[str, Any]) -> str | None:
    """Which useless call (if any) the demonstration of `item` makes: a deterministic function of its id."""
    u = random.Random(f"redundant-{item['id']}").random()
    q = item["question"]
    if item["task_type"] == "math" and "*" in q:
        kinds = ("repeat", "fail_first")
    elif item["task_type"] == "math":
        kinds = ("easy_call",)
    else:
        kinds = ("wrong_entity",)
    edge = 0.0
    for kind in kinds:
        edge += REDUNDANT_SHARE[kind]
        if u < edge:
            return kind
    return None


class TaskError(ValueError):
    pass


def render_prompt(question: str) -> str:
    """The one prompt format: a question, then the model writes tagged turns."""
    return f"Question: {question}\n"


def arithmetic_items(*, n: int, seed: int, hard_fraction: float = 0.75, prefix: str = "arith") -> list[dict[str, Any]]:
    rng = random.Random(seed)
    items = []
    for i in range(n):
        if rng.random() < hard_fraction:
            a, b = rng.randint(100, 999), rng.randint(100, 999)
            q, ans, needs_tool = f"What is {a} * {b}?", str(a * b), True
        else:
            a, b = rng.randint(1, 4), rng.randint(1, 4)
            q, ans, needs_tool = f"What is {a} + {b}?", str(a + b), False
        items.append({"id": f"{prefix}-{seed}-{i}", "question": q, "answers": [ans], "task_type": "math",
                      "needs_tool": needs_tool})
    return items


MAX_ITEM_LINE_BYTES = 1 << 20  # a task line longer than this is a broken file, not a question


def load_jsonl_items(path: str | Path) -> list[dict[str, Any]]:
    """Load task items; every bad line raises TaskError naming file:line and the field.

    Also refused, naming the line: bytes that are not UTF-8, a line over MAX_ITEM_LINE_BYTES, empty
    answers. A file with no item at all is an error too (a run would otherwise admit nothing)."""
    items = []
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            where = f"{path}:{lineno}"
            if len(raw) > MAX_ITEM_LINE_BYTES:
                raise TaskError(f"{where}: line is {len(raw)} bytes; task lines must be under "
                                f"{MAX_ITEM_LINE_BYTES} bytes (one JSON object per line)")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise TaskError(f"{where}: not UTF-8 (byte {exc.start}: {raw[exc.start:exc.start + 1]!r}); "
                                f"re-encode the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TaskError(f"{where}: invalid JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise TaskError(f"{where}: expected a JSON object with question/answers")
            if not isinstance(obj.get("question"), str) or not obj["question"].strip():
                raise TaskError(f"{where}: field 'question' must be a non-empty string")
            answers = obj.get("answers", obj.get("answer"))
            if isinstance(answers, str):
                answers = [answers]
            if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a.strip()
                                                                        for a in answers):
                raise TaskError(f"{where}: field 'answers' must be a non-empty string or a non-empty list of "
                                f"non-empty strings")
            task_type = obj.get("task_type", "qa")
            if task_type not in ("qa", "math", "em"):
                raise TaskError(f"{where}: field 'task_type'={task_type!r}; expected qa, math or em")
            items.append(
                {"id": str(obj.get("id", f"{Path(path).stem}-{lineno}")), "question": obj["question"],
                 "answers": answers, "task_type": task_type}
            )
    if not items:
        raise TaskError(f"{path}: no task items (the file is empty); expected one JSON object per line with "
                        f"'question' and 'answers'")
    return items


def make_items(*, task: str, n: int, seed: int, path: str | None = None,
               multihop_source: Callable[[int, int], list[dict[str, Any]]] | None = None,
               format: str = "tasks", fields: Any = None) -> list[dict[str, Any]]:
    """Items for one split. `multihop_source(n, seed)` supplies corpus questions; with task=jsonl the
    file at `path` is read whole by the loader registered as `format` (tepo_ray.data.loaders)."""
    if task == "jsonl":
        if not path:
            raise TaskError("data.task=jsonl needs data.train_path / data.eval_path")
        from tepo_ray.data.loaders import load_dataset

        return load_dataset(format, path, fields=dict(fields) if fields is not None else None).items[:n]
    if task == "arithmetic":
        return arithmetic_items(n=n, seed=seed)
    if task in ("multihop", "mixed"):
        if multihop_source is None:
            raise TaskError(f"data.task={task} needs a corpus (multihop_source)")
        if task == "multihop":
            return multihop_source(n, seed)
        n_hop = n // 2
        items = arithmetic_items(n=n - n_hop, seed=seed) + multihop_source(n_hop, seed)
        random.Random(seed).shuffle(items)
        return items
    raise TaskError(f"unknown data.task={task!r}; expected arithmetic, multihop, mixed or jsonl")


def demonstration(item: dict[str, Any], *, run_python: Callable[[str], str] | None = None,
                  search: Callable[[str], str] | None = None) -> list[Piece]:
    """A tool-use demonstration for SFT as (text, trainable) pieces.

    Observations come from the real tools (`run_python`, `search`) so SFT sees the
    same observation distribution as RL; they are not trainable. `redundancy_kind(item)`
    decides whether it also makes a useless call; for QA items the wrong-entity search
    uses `item["wrong_query"]` (another entity's title, filled by the caller) when present.
    """
    pieces: list[Piece] = [(render_prompt(item["question"]), False)]
    answer = item["answers"][0]
    q = item["question"]
    kind = redundancy_kind(item)

    def python_call(think: str, code: str) -> str:
        obs = run_python(code) if run_python else answer + "\n"
        pieces.extend([(f"<think>{think}</think><python>{code}</python>", True), (f"<result>{obs}</result>", False)])
        return obs

    if item["task_type"] == "math" and "*" in q:
        expr = q.removeprefix("What is ").rstrip("?")
        code = f"print({expr})"
        # A rough estimate first: uncertain digits a small model cannot know (high entropy), which the
        # exact tool result then settles (the entropy drop TEPO rewards).
        estimate = f"{float(answer):.1e}".replace("+0", "").replace("+", "")
        think = f"about {estimate}, too hard to do exactly"
        if kind == "fail_first":  # a broken call whose error observation helps nothing
            python_call(think, f"print({expr}")
        obs = python_call(think, code)
        if kind == "repeat":  # the same call again: its observation adds nothing new
            obs = python_call(f"the tool says {obs.strip()}", code)
        pieces.append((f"<think>the tool says {obs.strip()}</think><answer>{obs.strip()}</answer>", True))
    elif item["task_type"] == "math":
        if kind == "easy_call":  # a call the item does not need
            expr = q.removeprefix("What is ").rstrip("?")
            obs = python_call("easy", f"print({expr})")
            pieces.append((f"<think>the tool says {obs.strip()}</think><answer>{answer}</answer>", True))
        else:
            pieces.append((f"<think>easy</think><answer>{answer}</answer>", True))
    else:
        hops = list(item.get("hop_queries") or [q])
        if kind == "wrong_entity" and item.get("wrong_query"):  # a search for another entity first
            hops.insert(0, item["wrong_query"])
        for query in hops:
            obs = search(query) if search else ""
            pieces += [(f"<think>look it up</think><search>{query}</search>", True), (f"<result>{obs}</result>", False)]
        pieces += [(f"<think>found it</think><answer>{answer}</answer>", True)]
    return pieces


def iter_batches(items: Sequence[Any], *, size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield list(items[i : i + size])
