"""Token roles from decode offsets: tags as one token or several, multi-byte characters, EOS."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trainer"))
from span_tokenizers import bpe_tokenizer  # noqa: E402

from tepo_ray.agent.spans import (  # noqa: E402
    ROLE_ACTION,
    ROLE_TAG,
    ROLE_TEXT,
    ROLE_THINK,
    char_roles,
    token_char_ends,
    token_roles,
    turn_spans,
)

TURN = "<think>about 1.2e5, é→ hard</think><python>print(123*456)</python>"


@pytest.fixture(scope="module", params=[True, False], ids=["tags-one-token", "tags-split"])
def tok(request):
    return bpe_tokenizer(tags_as_tokens=request.param)


def test_char_roles_of_a_turn():
    text = "hi <think>ab</think><answer>x</answer>"
    roles = char_roles(text)
    got = {i: r for i, r in enumerate(roles)}
    assert [got[i] for i in range(3)] == [ROLE_TEXT] * 3
    assert [got[text.index("ab") + j] for j in range(2)] == [ROLE_THINK] * 2
    assert got[text.index(">x<") + 1] == ROLE_ACTION
    assert all(got[i] == ROLE_TAG for i in range(text.index("<think>"), text.index("<think>") + 7))


def test_unclosed_think_runs_to_the_next_tag_and_unknown_tags_are_excluded():
    text = "<think>plan <b>x</b> more<python>1</python>"
    roles = char_roles(text)
    assert roles[text.index("plan")] == ROLE_THINK and roles[text.index("more")] == ROLE_THINK
    assert roles[text.index("x")] == ROLE_THINK  # an unknown tag does not close <think>
    assert roles[text.index("<b>")] == ROLE_TAG
    assert roles[text.index("1")] == ROLE_ACTION


def test_char_ends_match_exact_prefix_decodes(tok):
    ids = tok.encode(TURN, add_special_tokens=False) + [tok.eos_token_id]
    exact = [len(tok.decode(ids[: i + 1], skip_special_tokens=False)) for i in range(len(ids))]
    full = tok.decode(ids, skip_special_tokens=False)
    ends = token_char_ends(tok, ids)
    assert ends[-1] == len(full) == exact[-1]
    # Same partition of the text; a token that only starts a multi-byte character covers nothing.
    for i, (e, x) in enumerate(zip(ends, exact)):
        assert e == x or full[e : x] == "" or "\ufffd" in tok.decode(ids[: i + 1], skip_special_tokens=False)


def test_think_tokens_are_exactly_the_tokens_inside_the_think_content(tok):
    ids = tok.encode(TURN, add_special_tokens=False) + [tok.eos_token_id]
    roles = token_roles(tok, ids)
    full = tok.decode(ids, skip_special_tokens=False)
    lo, hi = full.index("<think>") + len("<think>"), full.index("</think>")
    exact = [0] + [len(tok.decode(ids[: i + 1], skip_special_tokens=False)) for i in range(len(ids))]
    for i, r in enumerate(roles):
        a, b = exact[i], exact[i + 1]
        if a == b:  # partial bytes of a character: role of that character
            continue
        inside = lo <= a and b <= hi
        if r == ROLE_THINK:
            assert inside, (i, full[a:b])
        elif inside:
            pytest.fail(f"token {i} {full[a:b]!r} lies inside <think> but has role {r}")
    assert roles[-1] == ROLE_TAG  # EOS is a special token
    code = "".join(full[exact[i] : exact[i + 1]] for i, r in enumerate(roles) if r == ROLE_ACTION)
    assert code in "print(123*456)" and "123" in code
    reasoning, nontag = turn_spans(tok, ids, offset=10)
    assert reasoning and all(10 <= a < b <= 10 + len(ids) for a, b in reasoning + nontag)
    assert sum(b - a for a, b in nontag) > sum(b - a for a, b in reasoning)


def test_a_split_tag_never_counts_as_reasoning():
    tok = bpe_tokenizer(tags_as_tokens=False)
    ids = tok.encode(TURN, add_special_tokens=False)
    assert len(tok.encode("</think>", add_special_tokens=False)) > 1  # the case this test is about
    roles = token_roles(tok, ids)
    think_text = "".join(tok.decode([i]) for i, r in zip(ids, roles) if r == ROLE_THINK)
    assert "<" not in think_text and ">" not in think_text and "hard" in think_text
