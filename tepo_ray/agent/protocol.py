"""The agent's tag protocol and a parser that never raises.

A response interleaves reasoning, tool calls and observations::

    <think>…</think><python>code</python><result>stdout</result>
    <think>…</think><search>query</search><result>docs</result>
    <think>…</think><answer>final</answer>

Generation is cut at the close tag of an action (`</python>`, `</search>`,
`</answer>`), so one *turn* holds at most one action. `parse_turn` maps the text
of one turn to exactly one `Action`; `parse_response` maps a whole response.
Every input string, however malformed, yields a defined outcome:

* a well-formed tool call            -> ToolAction(tool, argument)
* a well-formed answer               -> AnswerAction(answer)
* no action (EOS / length cut)       -> NoAction (the trajectory ends with no answer)
* anything malformed                 -> Malformed(reason); for a turn that tried to call
  a tool (unknown tool tag, empty code, nested or unclosed tags) the loop shows the
  reason to the model as an error observation and continues; otherwise "no answer".

Several `<answer>` blocks in one response count as malformed (no answer): this
closes a reward hack where the policy lists many guesses to raise token F1.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence, Union

__all__ = [
    "TOOL_TAGS",
    "ACTION_TAGS",
    "ALL_TAGS",
    "SPECIAL_TOKENS",
    "ToolAction",
    "AnswerAction",
    "NoAction",
    "Malformed",
    "Action",
    "ParsedResponse",
    "parse_turn",
    "parse_response",
    "stop_strings",
    "format_observation",
]

TOOL_TAGS: tuple[str, ...] = ("python", "search")
ACTION_TAGS: tuple[str, ...] = (*TOOL_TAGS, "answer")
ALL_TAGS: tuple[str, ...] = ("think", *ACTION_TAGS, "result")
# Tags as single tokens (the embedded tokenizer adds them as special tokens).
SPECIAL_TOKENS: tuple[str, ...] = tuple(t for tag in ALL_TAGS for t in (f"<{tag}>", f"</{tag}>"))

_TAG_RE = re.compile(r"<(/?)([A-Za-z_][A-Za-z0-9_\-]{0,31})>")
_PROTOCOL_TAG_RE = re.compile(r"<\s*/?\s*(?:" + "|".join(map(re.escape, ALL_TAGS)) + r")\b[^>]{0,64}>", re.IGNORECASE)


@dataclass(frozen=True)
class ToolAction:
    tool: str
    argument: str


@dataclass(frozen=True)
class AnswerAction:
    answer: str


@dataclass(frozen=True)
class NoAction:
    reason: str = "no action"


@dataclass(frozen=True)
class Malformed:
    reason: str
    tool_attempt: bool = False  # True when the turn tried to call a tool: shown as an error observation


Action = Union[ToolAction, AnswerAction, NoAction, Malformed]


def stop_strings() -> list[str]:
    """Close tags at which a generation turn stops."""
    return [f"</{t}>" for t in ACTION_TAGS]


def format_observation(text: str) -> str:
    """Observation block appended after a tool call (loss mask 0).

    Tool output is untrusted (a web page, a snippet's print): a protocol tag inside it is defanged
    (`<` -> `&lt;`) so an observation can neither close the `<result>` block nor open an action."""
    return f"<result>{_PROTOCOL_TAG_RE.sub(lambda m: '&lt;' + m.group(0)[1:], text)}</result>"


def _blocks(text: str) -> tuple[list[tuple[str, str]], str | None, bool]:
    """Scan known tags. Returns (closed action blocks [(tag, inner)], first error, unknown_tool_seen)."""
    blocks: list[tuple[str, str]] = []
    open_tag: str | None = None
    open_end = 0
    error: str | None = None
    unknown_tool = False
    for m in _TAG_RE.finditer(text):
        closing, name = m.group(1) == "/", m.group(2)
        if name not in ALL_TAGS:
            # An XML-looking tag we do not know, e.g. <bash>…</bash>: an attempted unknown tool.
            if closing and open_tag is None:
                unknown_tool = True
                error = error or f"unknown tool tag <{name}>; available tools: {', '.join(TOOL_TAGS)}"
            continue
        if name == "result":
            error = error or "the model wrote a <result> tag; observations come only from tools"
            continue
        if not closing:
            if open_tag is not None and open_tag != "think":
                error = error or f"<{name}> opened inside unclosed <{open_tag}>"
                continue
            if open_tag == "think" and name != "think":
                # Forgotten </think>: close it implicitly (a common, harmless slip).
                open_tag = None
            if open_tag == "think":
                error = error or "<think> opened inside unclosed <think>"
                continue
            open_tag, open_end = name, m.end()
        else:
            if open_tag != name:
                error = error or f"</{name}> without a matching <{name}>"
                continue
            if name != "think":
                blocks.append((name, text[open_end : m.start()]))
            open_tag = None
    if open_tag is not None and open_tag != "think":
        error = error or f"unclosed <{open_tag}>"
    return blocks, error, unknown_tool


def parse_turn(text: str) -> Action:
    """Map the text generated in one turn to one action; never raises."""
    if not isinstance(text, str):
        return Malformed(f"turn text must be str, got {type(text).__name__}")
    blocks, error, unknown_tool = _blocks(text)
    answers = [b for b in blocks if b[0] == "answer"]
    tools = [b for b in blocks if b[0] in TOOL_TAGS]
    if len(answers) > 1:
        return Malformed("several <answer> blocks")
    if error is not None:
        tried_tool = unknown_tool or bool(tools) or any(f"<{t}>" in text for t in TOOL_TAGS)
        return Malformed(error, tool_attempt=tried_tool and not answers)
    if not blocks:
        return NoAction()
    tag, inner = blocks[0]
    if len(blocks) > 1:
        return Malformed(f"several actions in one turn ({', '.join(b[0] for b in blocks)})", tool_attempt=not answers)
    if tag == "answer":
        return AnswerAction(inner.strip())
    if not inner.strip():
        return Malformed(f"empty <{tag}> call", tool_attempt=True)
    return ToolAction(tag, inner.strip("\n"))


@dataclass(frozen=True)
class ParsedResponse:
    calls: tuple[ToolAction, ...]
    answer: str | None
    error: str | None


def parse_response(text: str) -> ParsedResponse:
    """Parse a whole response (observations included); never raises.

    The answer is the single `<answer>` block; none or several -> answer None.
    """
    if not isinstance(text, str):
        return ParsedResponse((), None, f"response must be str, got {type(text).__name__}")
    stripped = re.sub(r"<result>.*?</result>", "", text, flags=re.S)
    blocks, error, _ = _blocks(stripped)
    calls = tuple(ToolAction(t, a.strip("\n")) for t, a in blocks if t in TOOL_TAGS and a.strip())
    answers = [a for t, a in blocks if t == "answer"]
    if len(answers) > 1:
        return ParsedResponse(calls, None, "several <answer> blocks")
    return ParsedResponse(calls, answers[0].strip() if answers else None, error)


def stop_token_ids(tokenizer: object, strings: Sequence[str] | None = None) -> list[int]:
    """Token ids of the stop tags; each must be a single token of the tokenizer."""
    ids = []
    for s in strings or stop_strings():
        enc = tokenizer.encode(s, add_special_tokens=False)  # type: ignore[attr-defined]
        if len(enc) != 1:
            raise ValueError(
                f"stop tag {s!r} is {len(enc)} tokens for this tokenizer; add the agent tags as special tokens "
                f"(tepo_ray.agent.SPECIAL_TOKENS)"
            )
        ids.append(enc[0])
    return ids
