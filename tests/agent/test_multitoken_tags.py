"""Agent tags that are several tokens: stock-layout chat tokenizer, stop strings in both engines, exact ids.

The model (tests/agent/chat_fixtures.py) was trained on one episode laid out as the agent loop lays it
out, so greedy rollouts must reproduce that episode token for token; the first turn's stop string
`</python>` ends inside the token `>\\n`, which must be kept whole.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chat_fixtures import OBSERVATION, QUESTION, TURN1, ChatModel
from tepo_ray.agent import SPECIAL_TOKENS, TokenText, stop_conditions, tag_token_spans
from tepo_ray.agent.prompts import PromptBuilder
from tepo_ray.config import EngineConfig, PromptConfig
from tepo_ray.rollout import AgentLoop, CallableToolRouter, EngineBatcher, ToolOutcome


def test_chat_tokenizer_has_the_standard_layout_and_splits_every_tag(chat_model: ChatModel) -> None:
    from transformers import AutoTokenizer

    base = Path(chat_model.model_dir).parent / "base"
    files = {p.name for p in base.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "config.json", "model.safetensors"} <= files
    assert "chat_template" in json.loads((base / "tokenizer_config.json").read_text())
    tok = AutoTokenizer.from_pretrained(str(base))
    assert all(len(tok.encode(t, add_special_tokens=False)) > 1 for t in SPECIAL_TOKENS)
    assert stop_conditions(tok) == ([], ["</python>", "</search>", "</answer>"])
    # the close tag of turn 1 ends inside its last token
    assert tok.decode(chat_model.turn1_ids[-1:]) == ">\n"


def test_prompt_uses_the_chat_template_and_system_prompt_file(chat_model: ChatModel) -> None:
    tok = chat_model.tokenizer
    builder = PromptBuilder.from_config(tok, PromptConfig(system_prompt_path=chat_model.system_prompt_file))
    assert builder.mode == "chat"
    text = tok.decode(builder.prompt_ids(QUESTION))
    assert text == (f"<|im_start|>system\n{Path(chat_model.system_prompt_file).read_text()}<|im_end|>\n"
                    f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n")
    plain = PromptBuilder.from_config(tok, PromptConfig(use_chat_template="false"))
    assert tok.decode(plain.prompt_ids(QUESTION)) == f"Question: {QUESTION}\n"


def test_token_text_maps_tags_to_exact_tokens(chat_model: ChatModel) -> None:
    tok = chat_model.tokenizer
    tt = TokenText(tok, chat_model.turn1_ids)
    assert tt.text == TURN1
    assert "".join(tt.text[a:b] for a, b in tt.offsets) == tt.text
    for j, (a, b) in enumerate(tt.offsets):
        assert tt.text[a:b] == tok.decode([chat_model.turn1_ids[j]])
    (j0, j1), = tag_token_spans(tt, "python")
    pieces = [tok.decode([t]) for t in chat_model.turn1_ids[j0:j1]]
    assert pieces[0] == ">print" and pieces[-1] == ")</"  # straddling tokens belong to the span
    assert "".join(pieces).find("print(412*37)") >= 0
    (k0, k1), = tag_token_spans(tt, "think")
    assert tok.decode(chat_model.turn1_ids[k0:k1]) == ">I need the tool"  # inner text ends inside " tool"


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from(list("ab <>/\n") + ["é", "漢", "🙂", "python", "</answer>"]), max_size=20).map("".join))
def test_token_text_offsets_cover_text_with_multibyte_chars(chat_model: ChatModel, text: str) -> None:
    tok = chat_model.tokenizer
    ids = tok.encode(text, add_special_tokens=False)
    tt = TokenText(tok, ids)
    assert tt.text == text
    assert [a for a, _ in tt.offsets[1:]] == [b for _, b in tt.offsets[:-1]]  # contiguous
    if ids:
        assert tt.offsets[0][0] == 0 and tt.offsets[-1][1] == len(text)
    for j in range(len(ids)):  # where a prefix decodes to whole characters, the offsets end exactly there
        prefix = tok.decode(ids[: j + 1])
        if not prefix.endswith("\ufffd"):
            assert tt.offsets[j][1] == len(prefix) and text.startswith(prefix)


ENGINES = [pytest.param("hf", id="hf"), pytest.param("vllm", id="vllm", marks=pytest.mark.vllm)]


@pytest.fixture(scope="module", params=ENGINES)
def engine(request: pytest.FixtureRequest, chat_model: ChatModel):
    from tepo_ray.engines import make_engine, vllm_available

    if request.param == "vllm":
        ok, why = vllm_available()
        if not ok:
            pytest.skip(why)
    eng = make_engine(EngineConfig(name=request.param, max_context=300, max_num_seqs=4, max_turn_tokens=40,
                                   max_new_tokens=120, temperature=0.0),
                      model_path=chat_model.model_dir)
    yield eng
    eng.shutdown()


def test_engine_stops_on_a_multi_token_tag_keeping_the_whole_token(engine, chat_model: ChatModel) -> None:
    from tepo_ray.engines.base import GenerationRequest

    tok = chat_model.tokenizer
    _, strings = stop_conditions(tok)
    outs = engine.generate([GenerationRequest(chat_model.prompt_ids, 40)] * 2, temperature=0.0, top_p=1.0,
                           stop_token_ids=[tok.eos_token_id], stop=strings)
    for out in outs:
        assert out.token_ids == chat_model.turn1_ids
        assert (out.finish_reason, out.stop_str, out.stop_token) == ("stop", "</python>", chat_model.turn1_ids[-1])
        assert len(out.logprobs) == len(out.token_ids)
    # without the stop strings the same model runs past the tag
    longer = engine.generate([GenerationRequest(chat_model.prompt_ids, len(chat_model.turn1_ids) + 3)],
                             temperature=0.0, top_p=1.0, stop_token_ids=[tok.eos_token_id])[0]
    assert longer.token_ids[: len(chat_model.turn1_ids)] == chat_model.turn1_ids
    assert len(longer.token_ids) > len(chat_model.turn1_ids) and longer.stop_str is None


def test_rollout_ids_and_masks_are_exact_with_multi_token_tags(engine, chat_model: ChatModel) -> None:
    tok = chat_model.tokenizer
    ids, strings = stop_conditions(tok)
    batcher = EngineBatcher(engine, sampling=dict(temperature=0.0, top_p=1.0,
                                                  stop_token_ids=ids + [tok.eos_token_id], stop=strings))
    calls: list[str] = []

    def python(code: str) -> ToolOutcome:
        calls.append(code)
        return ToolOutcome(OBSERVATION, None, 0.0)

    prompts = PromptBuilder.from_config(tok, PromptConfig(system_prompt_path=chat_model.system_prompt_file))
    loop = AgentLoop(batcher=batcher, tokenizer=tok, tools=CallableToolRouter({"python": python}),
                     engine_cfg=engine.cfg, max_observation_chars=400, eos_token_id=tok.eos_token_id,
                     prompts=prompts)
    item = {"id": "q", "question": QUESTION, "answers": ["15244"], "task_type": "math"}
    trajs = asyncio.run(loop.rollout_group(item, group_id="g", group_size=2))
    p, t1, obs, t2 = chat_model.prompt_ids, chat_model.turn1_ids, chat_model.obs_ids, chat_model.turn2_ids[:-1]
    for tr in trajs:
        assert tr.token_ids == p + t1 + obs + t2  # exactly the sampled ids + observation ids, nothing re-tokenised
        assert tr.loss_mask == [0] * len(p) + [1] * len(t1) + [0] * len(obs) + [1] * len(t2)
        assert tr.versions == [-1] * len(p) + [0] * len(t1) + [-1] * len(obs) + [0] * len(t2)
        assert (tr.finish_reason, tr.answer) == ("answer", "15244")
        assert [(s.start, s.end, s.tool_call_index) for s in tr.segments] == [
            (len(p), len(p) + len(t1), 0), (len(p) + len(t1) + len(obs), len(tr.token_ids), None)]
        assert tr.tool_calls[0].argument == "print(412*37)"
    assert calls == ["print(412*37)"] * 2


def test_generation_worker_wires_stop_strings_and_chat_prompts(chat_model: ChatModel) -> None:
    """The actor class (used without Ray here) picks stop strings for this tokenizer and chat-template prompts."""
    from actors.generation import GenerationWorker

    cfg = EngineConfig(name="hf", max_context=300, max_turn_tokens=40, max_new_tokens=120, temperature=0.0)
    worker = GenerationWorker(engine_cfg=cfg, model_path=chat_model.model_dir, pools={}, max_observation_chars=400,
                              prompt_cfg=PromptConfig(system_prompt_path=chat_model.system_prompt_file))
    try:
        assert worker.batcher.sampling["stop"] == ["</python>", "</search>", "</answer>"]
        item = {"id": "q", "question": QUESTION, "answers": ["15244"], "task_type": "math"}
        (traj,) = asyncio.run(worker.generate_group(item, group_id="g", group_size=1))
    finally:
        worker.shutdown()
    p, t1 = chat_model.prompt_ids, chat_model.turn1_ids
    assert traj["token_ids"][: len(p) + len(t1)] == p + t1
    assert traj["loss_mask"][: len(p) + len(t1)] == [0] * len(p) + [1] * len(t1)
    assert traj["tool_calls"][0]["argument"] == "print(412*37)"  # no python pool: an error observation follows
