"""Which generated tokens of a turn are reasoning: token roles from decode offsets.

TEPO's ΔH_k compares the *reasoning* before and after tool call k
(docs/algorithm.md). A generated turn such as::

    <think>about 1.2e5, too hard</think><python>print(123*456)</python>

holds reasoning (the `<think>` content), tags, and an action block (tool
argument or answer). `token_roles` labels every generated token with one of
`ROLE_THINK`, `ROLE_TAG`, `ROLE_ACTION`, `ROLE_TEXT` (free text outside any
block). The labels come from the token ids that were actually sampled: each
token's character span in `tokenizer.decode(ids)` is found by incremental
decoding (`tokenizers`' DecodeStream, or vLLM's detokenizer method for slow
tokenizers), never by re-tokenising text, so a
tag that is one token (the embedded tokenizer) and a tag split over several
tokens (most hub tokenizers) are labelled the same way.

Rules: a token any of whose characters belong to a tag (`<think>`, `</python>`,
an unknown `<bash>`, ...) or that is a special token of the tokenizer (EOS) is a
tag; otherwise it takes the role of its characters. A token that only holds
the first bytes of a multi-byte character takes the role of that character.
An unclosed `<think>` runs to the next tag or the end of the turn.
"""

from __future__ import annotations

import itertools
import re
from typing import Any, Sequence

from tepo_ray.agent.protocol import ALL_TAGS

__all__ = ["ROLE_THINK", "ROLE_TAG", "ROLE_ACTION", "ROLE_TEXT", "token_char_ends", "char_roles", "token_roles",
           "role_spans", "turn_spans"]

ROLE_THINK = "think"  # inside <think>…</think>: the reasoning ΔH is measured on
ROLE_TAG = "tag"  # tag characters, or a special token (EOS)
ROLE_ACTION = "action"  # inside a tool call or <answer> block
ROLE_TEXT = "text"  # free text outside every block

_ANY_TAG_RE = re.compile(r"</?[A-Za-z_][A-Za-z0-9_\-]{0,31}>")


def _decode(tokenizer: Any, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=False)


def _stream_pieces(tokenizer: Any, ids: list[int]) -> list[str] | None:
    """Per-token text pieces from the `tokenizers` library's incremental decoder (fast tokenizers only);
    a token that does not complete a character gives ""."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    try:
        from tokenizers.decoders import DecodeStream
    except ImportError:  # tokenizers < 0.21
        return None
    stream = DecodeStream(skip_special_tokens=False)
    return [stream.step(backend, i) or "" for i in ids]


def _python_pieces(tokenizer: Any, ids: list[int]) -> list[str]:
    """The same pieces with `tokenizer.decode` only (the method of vLLM's detokenizer): each step decodes
    the few tokens since the last emitted prefix, so the cost is O(n) small decodes."""
    pieces: list[str] = []
    prefix = read = 0  # tokens [prefix, read) were decoded last and are already emitted
    for i in range(len(ids)):
        before = _decode(tokenizer, ids[prefix:read])
        now = _decode(tokenizer, ids[prefix : i + 1])
        if len(now) > len(before) and not now.endswith("\ufffd") and now.startswith(before):
            pieces.append(now[len(before):])
            prefix, read = read, i + 1
        else:
            pieces.append("")
    return pieces


def token_char_ends(tokenizer: Any, ids: Sequence[int]) -> list[int]:
    """End offset of every token's characters in `tokenizer.decode(ids)` (non-decreasing).

    Token i covers characters `[ends[i-1], ends[i])` (`ends[-1]` = 0). A token that
    does not complete a character (the first bytes of a multi-byte one) covers none.
    Incremental decoding (`tokenizers.decoders.DecodeStream` for fast tokenizers, ~1 µs a
    token; else a few `decode` calls a token). If the pieces do not add up to the full
    decode (a tokenizer whose decode is not prefix-stable), exact prefix decodes are used.
    """
    ids = list(ids)
    full = _decode(tokenizer, ids)
    for pieces_of in (_stream_pieces, _python_pieces):
        pieces = pieces_of(tokenizer, ids)
        if pieces is None:
            continue
        joined = "".join(pieces)
        if full.startswith(joined) and set(full[len(joined):]) <= {"\ufffd"}:
            ends, total = [], 0
            for piece in pieces:
                total += len(piece)
                ends.append(total)
            return ends
    return [len(_decode(tokenizer, ids[: i + 1])) for i in range(len(ids))]


def char_roles(text: str) -> list[str]:
    """The role of every character of one turn's text (see the module docstring)."""
    roles = [ROLE_TEXT] * len(text)
    known = set(ALL_TAGS)
    block: str | None = None  # open known tag
    block_start = 0
    for m in _ANY_TAG_RE.finditer(text):
        name = m.group(0).strip("</>")
        closing = m.group(0).startswith("</")
        if block is not None:
            roles[block_start : m.start()] = [ROLE_THINK if block == "think" else ROLE_ACTION] * (m.start() - block_start)
        roles[m.start() : m.end()] = [ROLE_TAG] * (m.end() - m.start())
        if name in known:  # an unknown tag (e.g. <bash>) is excluded but opens/closes nothing
            block = None if closing else name
        block_start = m.end()
    if block is not None:  # unclosed block runs to the end of the turn
        roles[block_start:] = [ROLE_THINK if block == "think" else ROLE_ACTION] * (len(text) - block_start)
    return roles


def token_roles(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """One role per token of `ids` (one generated turn)."""
    ids = list(ids)
    if not ids:
        return []
    text = _decode(tokenizer, ids)
    roles_c = char_roles(text)
    ends = token_char_ends(tokenizer, ids)
    special = set(getattr(tokenizer, "all_special_ids", None) or [])
    out: list[str] = []
    start = 0
    for i, end in enumerate(ends):
        chars = roles_c[start:end] if end > start else roles_c[end : end + 1]
        if ids[i] in special or ROLE_TAG in chars:
            out.append(ROLE_TAG)
        elif chars:
            out.append(chars[0] if chars.count(chars[0]) == len(chars) else ROLE_TEXT)
        else:  # nothing decodes from here on (trailing partial bytes)
            out.append(ROLE_TEXT)
        start = end
    return out


def role_spans(roles: Sequence[str], wanted: set[str] | frozenset[str], *, offset: int = 0) -> list[list[int]]:
    """Maximal runs `[start, end)` (shifted by `offset`) of tokens whose role is in `wanted`."""
    spans: list[list[int]] = []
    pos = offset
    for inside, run in itertools.groupby(roles, key=wanted.__contains__):
        n = sum(1 for _ in run)
        if inside:
            spans.append([pos, pos + n])
        pos += n
    return spans


def turn_spans(tokenizer: Any, ids: Sequence[int], *, offset: int) -> tuple[list[list[int]], list[list[int]]]:
    """(reasoning spans, non-tag spans) of one generated turn whose first token sits at `offset`:
    what the rollout records on its `Segment` (`reasoning_spans`, `nontag_spans`)."""
    roles = token_roles(tokenizer, ids)
    return (role_spans(roles, {ROLE_THINK}, offset=offset),
            role_spans(roles, {ROLE_THINK, ROLE_ACTION, ROLE_TEXT}, offset=offset))
