"""The multi-turn agent loop on a real (tiny, SFT-warm-started) model, real engine and real sandbox; no Ray."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tepo_ray.agent import stop_token_ids
from tepo_ray.config import load_config
from tepo_ray.data.tasks import arithmetic_items
from tepo_ray.rollout import AgentLoop, CallableToolRouter, EngineBatcher, ToolOutcome

from e2e_configs import CONFIG_FILES


@pytest.fixture(scope="module")
def setup(tiny_overrides):
    from transformers import AutoTokenizer

    from tepo_ray.prepare import prepare_data
    from tepo_ray.engines import make_engine
    from tepo_ray.tools.python_sandbox import PythonSandbox, format_observation

    cfg = load_config(CONFIG_FILES, [*tiny_overrides, "engine.name=hf", "engine.temperature=0"])
    model_path = prepare_data(cfg, progress=False).model_path
    tok = AutoTokenizer.from_pretrained(model_path)
    engine = make_engine(cfg.engine, model_path=model_path)
    sandbox = PythonSandbox.from_config(cfg.tools.python)

    def python(code: str) -> ToolOutcome:
        res = sandbox.run(code)
        return ToolOutcome(format_observation(res, max_chars=400), res.error, res.duration_s)

    yield cfg, tok, engine, CallableToolRouter({"python": python})
    sandbox.close()
    engine.shutdown()


def _run(setup, items, **engine_overrides):
    from omegaconf import OmegaConf

    cfg, tok, engine, router = setup
    ecfg = OmegaConf.merge(cfg.engine, engine_overrides)
    stops = stop_token_ids(tok) + [tok.eos_token_id]
    batcher = EngineBatcher(engine, sampling=dict(temperature=0.0, top_p=1.0, stop_token_ids=stops))
    loop = AgentLoop(batcher=batcher, tokenizer=tok, tools=router, engine_cfg=ecfg, max_observation_chars=400,
                     eos_token_id=tok.eos_token_id)

    async def go():
        return await asyncio.gather(*[loop.rollout_group(it, group_id=f"g{i}", group_size=2)
                                      for i, it in enumerate(items)])

    return [t for g in asyncio.run(go()) for t in g]


ITEMS = [it for it in arithmetic_items(n=12, seed=123) if "*" in it["question"]][:4]


def test_tool_calls_run_and_observations_are_masked(setup):
    _, tok, _, _ = setup
    trajs = _run(setup, ITEMS)
    assert len(trajs) == 8 and len({t.group_id for t in trajs}) == 4
    with_calls = [t for t in trajs if t.tool_calls]
    assert with_calls, "the warm-started policy made no tool call"
    for t in trajs:
        t.validate()
        assert sum(len(s) for s in t.segments) == t.num_generated  # segments cover exactly the sampled tokens
        masked = [tid for tid, m in zip(t.token_ids[t.prompt_len:], t.loss_mask[t.prompt_len:]) if m == 0]
        obs_text = tok.decode(masked, skip_special_tokens=False)
        assert obs_text.count("<result>") == len(t.tool_calls)
        for call in t.tool_calls:
            assert call.observation.strip() in obs_text
            assert t.segments[call.segment_index].tool_call_index is not None
    for t in with_calls:
        call = t.tool_calls[0]
        assert call.tool == "python" and call.error is None
        # the sandbox really ran the model's code
        expr = call.argument.strip().removeprefix("print(").removesuffix(")")
        assert call.observation.strip() == str(eval(expr, {"__builtins__": {}}))  # noqa: S307 - digits and '*'


def test_limits_end_trajectories_with_a_reason(setup):
    trajs = _run(setup, ITEMS[:2], max_turns=0)
    assert {t.finish_reason for t in trajs} <= {"max_turns", "answer"}
    assert any(t.finish_reason == "max_turns" for t in trajs)
    assert all(not t.tool_calls for t in trajs)

    trajs = _run(setup, ITEMS[:2], max_new_tokens=5, max_turn_tokens=5)
    assert all(t.finish_reason == "max_new_tokens" and t.num_generated <= 5 for t in trajs)

    prompt_len = _run(setup, ITEMS[:1], max_new_tokens=1, max_turn_tokens=1)[0].prompt_len
    trajs = _run(setup, ITEMS[:2], max_context=prompt_len + 12, max_new_tokens=64)
    for t in trajs:
        assert len(t.token_ids) <= prompt_len + 12
        assert t.finish_reason in ("max_context", "max_new_tokens", "answer")
    assert any(t.finish_reason == "max_context" for t in trajs)
