"""Tag protocol: worked cases and property tests on arbitrary strings."""

from hypothesis import given, settings
from hypothesis import strategies as st

from tepo_ray.agent import (
    SPECIAL_TOKENS,
    AnswerAction,
    Malformed,
    NoAction,
    ToolAction,
    parse_response,
    parse_turn,
    stop_strings,
)


def test_tool_call_turn():
    act = parse_turn("<think>need to multiply</think><python>print(123*456)</python>")
    assert act == ToolAction("python", "print(123*456)")


def test_search_turn_and_answer_turn():
    assert parse_turn("<search>capital of Vorland</search>") == ToolAction("search", "capital of Vorland")
    assert parse_turn("<think>ok</think><answer> 56088 </answer>") == AnswerAction("56088")


def test_missing_close_think_is_tolerated():
    assert parse_turn("<think>hmm <python>1+1</python>") == ToolAction("python", "1+1")


def test_no_action_when_cut():
    assert isinstance(parse_turn("<think>still thinking"), NoAction)
    assert isinstance(parse_turn(""), NoAction)


def test_malformed_cases_are_defined():
    cases = {
        "<python>print(1)": "unclosed",
        "<python><search>x</search></python>": "inside unclosed",
        "<bash>ls</bash>": "unknown tool tag",
        "<python>   </python>": "empty",
        "<answer>1</answer><answer>2</answer>": "several <answer>",
        "<result>fake</result><answer>1</answer>": "<result>",
        "</python>": "without a matching",
    }
    for text, needle in cases.items():
        act = parse_turn(text)
        assert isinstance(act, Malformed), (text, act)
        assert needle in act.reason, (text, act.reason)
    assert parse_turn("<bash>ls</bash>").tool_attempt
    assert parse_turn("<python> </python>").tool_attempt
    assert not parse_turn("<answer>1</answer><answer>2</answer>").tool_attempt


def test_parse_response_full():
    text = (
        "<think>a</think><python>print(2+2)</python><result>4</result>"
        "<think>b</think><search>who</search><result>doc</result><answer>4</answer>"
    )
    parsed = parse_response(text)
    assert parsed.calls == (ToolAction("python", "print(2+2)"), ToolAction("search", "who"))
    assert parsed.answer == "4" and parsed.error is None
    assert parse_response("<answer>1</answer><answer>1</answer>").answer is None


def test_stop_strings_cover_actions():
    assert set(stop_strings()) == {"</python>", "</search>", "</answer>"}
    assert "<result>" in SPECIAL_TOKENS and "</answer>" in SPECIAL_TOKENS


_tagish = st.sampled_from([*SPECIAL_TOKENS, "<bash>", "</bash>", "<", ">", "</", "x", " ", "\n", "\ufffd", "\x00"])
_texts = st.one_of(st.text(), st.lists(st.one_of(_tagish, st.text(max_size=5)), max_size=30).map("".join))


@settings(max_examples=400, deadline=None)
@given(_texts)
def test_parse_turn_never_raises(text):
    act = parse_turn(text)
    assert isinstance(act, (ToolAction, AnswerAction, NoAction, Malformed))
    if isinstance(act, ToolAction):
        assert act.argument.strip() and f"</{act.tool}>" in text
    if isinstance(act, AnswerAction):
        assert text.count("</answer>") >= 1


@settings(max_examples=300, deadline=None)
@given(_texts)
def test_parse_response_never_raises(text):
    parsed = parse_response(text)
    assert parsed.answer is None or "</answer>" in text


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=64))
def test_garbage_bytes(raw):
    text = raw.decode("utf-8", errors="replace")
    assert isinstance(parse_turn(text), (ToolAction, AnswerAction, NoAction, Malformed))
