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

Tags need not be single tokens. With a stock tokenizer `</python>` is several
tokens (`</` `python` `>`), and the token that completes a close tag may carry
more text (`>\n`, `><`). `stop_conditions(tokenizer)` says how the engines stop:
on token ids when every close tag is one token, else on stop strings. A turn
that stops on a string keeps the whole token that completed it (nothing is
truncated or re-tokenised; the characters after the tag stay in the sequence
and are trained like any generated token). The parser works on the decoded
text; `TokenText` maps every character back to the token that produced it, so
a span of text (a `<think>` block, a tool call) has exact token positions
(`tag_token_spans`).
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
    "stop_token_ids",
    "stop_conditions",
    "format_observation",
    "TokenText",
    "tag_token_spans",
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


def stop_conditions(tokenizer: object, strings: Sequence[str] | None = None) -> tuple[list[int], list[str]]:
    """(stop token ids, stop strings) for the engines.

    When every close tag is a single token of `tokenizer`, stop on those ids (exact
    and cheapest); otherwise stop on the tag strings, which both engines support
    (the token completing the string is kept whole).
    """
    tags = list(strings or stop_strings())
    encoded = [tokenizer.encode(s, add_special_tokens=False) for s in tags]  # type: ignore[attr-defined]
    if all(len(e) == 1 for e in encoded):
        return [e[0] for e in encoded], []
    return [], tags


class TokenText:
    """Decoded text of a token-id sequence with an exact map from characters to tokens.

    `offsets[j] = (start, end)`: the characters of `text` that token j produced
    (`text[start:end]`); offsets are contiguous and cover `text`. A token that
    ends inside a multi-byte character gets an empty span and the character is
    credited to the token that completes it. Built from incremental decodes of
    short windows (what vLLM's detokeniser does) and checked against one full
    decode; if the two disagree (a tokenizer whose decode is not prefix-stable),
    it falls back to decoding every prefix.
    """

    _WINDOW = 6

    def __init__(self, tokenizer: object, token_ids: Sequence[int]):
        self.token_ids = [int(t) for t in token_ids]
        dec = lambda ids: tokenizer.decode(ids, skip_special_tokens=False)  # type: ignore[attr-defined]  # noqa: E731
        self.text: str = dec(self.token_ids)
        ends = self._incremental_ends(dec)
        if ends is None or (ends and ends[-1] != len(self.text)):
            ends = self._prefix_ends(dec)
        starts = [0, *ends[:-1]]
        self.offsets: list[tuple[int, int]] = list(zip(starts, ends))

    def _incremental_ends(self, dec) -> list[int] | None:
        ends: list[int] = []
        built = ""
        pending_from = 0  # first token whose bytes are not yet a complete character
        for j in range(len(self.token_ids)):
            lo = max(0, pending_from - self._WINDOW)
            before = dec(self.token_ids[lo:pending_from])
            after = dec(self.token_ids[lo : j + 1])
            if after.endswith("\ufffd") and not self.text[len(built) :].startswith("\ufffd"):
                ends.append(len(built))  # incomplete character: wait for the token that completes it
                continue
            if not after.startswith(before):
                return None
            built += after[len(before) :]
            ends.append(len(built))
            pending_from = j + 1
        if built != self.text:
            return None
        return ends

    def _prefix_ends(self, dec) -> list[int]:
        ends, prev = [], 0
        for j in range(len(self.token_ids)):
            prefix = dec(self.token_ids[: j + 1])
            if self.text.startswith(prefix):  # else an incomplete character: credit it to a later token
                prev = max(prev, len(prefix))
            ends.append(prev)
        if ends:
            ends[-1] = len(self.text)
        return ends

    def token_at(self, char: int) -> int:
        """Index of the token that produced character `char` of `text`."""
        if not 0 <= char < len(self.text):
            raise IndexError(f"char {char} outside text of length {len(self.text)}")
        for j, (a, b) in enumerate(self.offsets):
            if a <= char < b:
                return j
        raise AssertionError("offsets do not cover the text")  # pragma: no cover - construction invariant

    def token_span(self, start: int, end: int) -> tuple[int, int]:
        """Token range [j0, j1) of every token overlapping characters [start, end) (end > start).

        A token straddling a boundary (`>print` holds the end of `<python>` and the
        start of the code) belongs to both sides' spans.
        """
        if not 0 <= start < end <= len(self.text):
            raise IndexError(f"char span [{start}, {end}) outside text of length {len(self.text)}")
        return self.token_at(start), self.token_at(end - 1) + 1


def tag_token_spans(token_text: TokenText, tag: str, *, inner: bool = True) -> list[tuple[int, int]]:
    """Token ranges of every closed `<tag>…</tag>` block in `token_text` (inner text only when `inner`).

    Blocks with empty inner text are skipped when `inner`. Positions index
    `token_text.token_ids`; add the turn's start offset for trajectory positions.
    """
    spans = []
    for m in re.finditer(rf"<{re.escape(tag)}>(.*?)</{re.escape(tag)}>", token_text.text, flags=re.S):
        a, b = (m.start(1), m.end(1)) if inner else (m.start(), m.end())
        if b > a:
            spans.append(token_text.token_span(a, b))
    return spans
