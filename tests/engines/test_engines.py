"""Both engines on a real tiny Qwen2: stop semantics, determinism, weight sync, behaviour log-probs.

One engine per kind for the whole module (the `engine` fixture); each test first
loads the weights it needs with `update_weights`, so test order does not matter.
"""

from __future__ import annotations

import pytest
import torch

from engine_fixtures import (
    ANSWER_PROMPT,
    ANSWER_TARGET,
    ENGINE_TEST_CFG,
    PYTHON_PROMPT,
    PYTHON_TARGET,
    LearnerState,
    agent_corpus,
    teacher_forced_logprobs,
)
from tepo_ray.engines import Engine, GenerationRequest
from tepo_ray.models import save_weights_safetensors

TOL = 1e-4  # fp32 engine vs learner forward


def _load(engine: Engine, path, version: int) -> None:
    engine.update_weights(str(path), version=version)
    assert engine.version == version


def _greedy(engine: Engine, prompts: list[list[int]], max_tokens: int | list[int], stops: list[int] = ()):
    budgets = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(prompts)
    reqs = [GenerationRequest(p, m, request_id=f"r{i}") for i, (p, m) in enumerate(zip(prompts, budgets))]
    return engine.generate(reqs, temperature=0.0, top_p=1.0, stop_token_ids=list(stops))


def _prompts(ls: LearnerState) -> list[list[int]]:
    return [ls.ids(PYTHON_PROMPT), ls.ids(ANSWER_PROMPT), ls.ids("Question: who wrote doc 17?\n<think>"),
            ls.ids("<python>print(3)</python><result>\n3\n</result>")]


# --------------------------------------------------------------------------- generation
def test_generate_returns_new_token_ids_within_budget(engine: Engine, learner_state: LearnerState) -> None:
    _load(engine, learner_state.base_weights, 0)
    prompts = _prompts(learner_state)
    budgets = [3, 9, 1, 6]
    outs = _greedy(engine, prompts, budgets)
    assert [o.request_id for o in outs] == ["r0", "r1", "r2", "r3"]
    for o, n in zip(outs, budgets):
        assert all(isinstance(t, int) and 0 <= t < engine.vocab_size for t in o.token_ids)
        assert o.logprobs is not None and len(o.logprobs) == len(o.token_ids)
        assert all(lp <= 0.0 for lp in o.logprobs)
        if o.finish_reason == "length":
            assert len(o.token_ids) == n and o.stop_token is None
            assert not set(o.token_ids) & set(engine.eos_token_ids)
        else:  # the random checkpoint may sample EOS early
            assert o.finish_reason == "eos" and o.token_ids[-1] == o.stop_token in engine.eos_token_ids
            assert len(o.token_ids) <= n


def test_stops_exactly_at_first_stop_token_and_includes_it(engine: Engine, learner_state: LearnerState) -> None:
    _load(engine, learner_state.base_weights, 0)
    prompts = _prompts(learner_state)
    free = _greedy(engine, prompts, 24)
    # a stop token the unconstrained greedy run really produces, after a few tokens
    row = next(o.token_ids for o in free if len(o.token_ids) > 6)
    stop = row[5]
    stopped = _greedy(engine, prompts, 24, stops=[stop])
    n_stopped = 0
    for f, s in zip(free, stopped):
        if stop in f.token_ids:
            cut = f.token_ids.index(stop) + 1
            assert s.token_ids == f.token_ids[:cut]
            assert s.finish_reason == "stop" and s.stop_token == stop == s.token_ids[-1]
            assert s.logprobs == pytest.approx(f.logprobs[:cut], abs=TOL)
            n_stopped += 1
        else:
            assert s.token_ids == f.token_ids and s.finish_reason == f.finish_reason
    assert n_stopped >= 1


def test_greedy_is_deterministic_and_independent_of_batch(engine: Engine, learner_state: LearnerState) -> None:
    _load(engine, learner_state.base_weights, 0)
    prompts = _prompts(learner_state)
    a = _greedy(engine, prompts, 12)
    b = _greedy(engine, prompts, 12)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    alone = _greedy(engine, [prompts[2]], 12)[0]  # no left padding around it now
    assert alone.token_ids == a[2].token_ids
    assert alone.logprobs == pytest.approx(a[2].logprobs, abs=TOL)


def test_seeded_sampling_is_reproducible(engine: Engine, learner_state: LearnerState) -> None:
    _load(engine, learner_state.base_weights, 0)
    reqs = [GenerationRequest(p, 16) for p in _prompts(learner_state)]
    run = lambda seed: [o.token_ids for o in engine.generate(  # noqa: E731
        reqs, temperature=1.0, top_p=0.95, stop_token_ids=[], seed=seed)]
    assert run(7) == run(7)
    assert run(7) != run(8)


def test_budget_is_clipped_to_max_context(engine: Engine, learner_state: LearnerState) -> None:
    _load(engine, learner_state.base_weights, 0)
    room = 3
    prompt = (learner_state.ids(PYTHON_PROMPT) * 40)[: ENGINE_TEST_CFG["max_context"] - room]
    out = _greedy(engine, [prompt], 50)[0]
    assert len(out.token_ids) <= room
    assert out.finish_reason in ("length", "eos")
    with pytest.raises(ValueError, match=r"requests\[0\].*max_context"):
        _greedy(engine, [prompt + [1] * room], 5)


def test_bad_requests_name_the_field(engine: Engine, learner_state: LearnerState) -> None:
    p = learner_state.ids(PYTHON_PROMPT)
    with pytest.raises(ValueError, match=r"requests\[1\]\.prompt_ids contains"):
        _greedy(engine, [p, p + [engine.vocab_size]], 4)
    with pytest.raises(ValueError, match=r"requests\[0\]\.max_tokens"):
        _greedy(engine, [p], 0)
    with pytest.raises(ValueError, match="top_p"):
        engine.generate([GenerationRequest(p, 4)], temperature=1.0, top_p=0.0, stop_token_ids=[])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        engine.update_weights("/nonexistent/weights.safetensors", version=3)


# --------------------------------------------------------------------------- weight sync
def test_weight_sync_matches_learner_forward(engine: Engine, learner_state: LearnerState) -> None:
    ls = learner_state
    seq = ls.ids(PYTHON_PROMPT + PYTHON_TARGET)
    _load(engine, ls.base_weights, 0)
    before = torch.tensor(engine.sequence_logprobs([seq])[0])
    assert (before - teacher_forced_logprobs(ls.base_model, seq)).abs().max() < TOL
    # fill the prefix cache with KV of the old weights; the sync must not reuse it
    _greedy(engine, [ls.ids(PYTHON_PROMPT)], 4)

    _load(engine, ls.trained_weights, 1)
    after = torch.tensor(engine.sequence_logprobs([seq])[0])
    ref = teacher_forced_logprobs(ls.learner, seq)
    assert (after - ref).abs().max() < TOL
    assert (before - ref).abs().max() > 100 * TOL

    # generation now follows the learner: the memorised tool call, cut at its close tag
    py_close = ls.tok("</python>")
    out = _greedy(engine, [ls.ids(PYTHON_PROMPT), ls.ids(ANSWER_PROMPT)], 40, stops=[py_close])
    assert out[0].token_ids == ls.ids(PYTHON_TARGET)
    assert out[0].finish_reason == "stop" and out[0].stop_token == py_close
    gen_ref = teacher_forced_logprobs(ls.learner, ls.ids(PYTHON_PROMPT) + out[0].token_ids)
    assert torch.tensor(out[0].logprobs) == pytest.approx(gen_ref[-len(out[0].token_ids):], abs=TOL)
    # ... and the answer ends with the model's EOS (not a caller stop token)
    assert out[1].token_ids == ls.ids(ANSWER_TARGET)
    assert out[1].finish_reason == "eos" and out[1].stop_token in engine.eos_token_ids

    # syncing back restores the old policy exactly
    _load(engine, ls.base_weights, 0)
    assert torch.tensor(engine.sequence_logprobs([seq])[0]) == pytest.approx(before, abs=TOL)


def test_weight_sync_does_not_reuse_cached_prompt_kv(engine: Engine, learner_state: LearnerState) -> None:
    """A prompt longer than a KV block (128 tokens on vLLM CPU) is prefix-cached; after a sync it must be recomputed."""
    ls = learner_state
    long_prompt = ls.ids(" ".join(agent_corpus(n=8, seed=3)))[:140]
    assert len(long_prompt) == 140
    req = [GenerationRequest(long_prompt, 8)]
    _load(engine, ls.base_weights, 0)
    engine.generate(req, temperature=0.0, top_p=1.0, stop_token_ids=[])
    _load(engine, ls.trained_weights, 1)
    out = engine.generate(req, temperature=0.0, top_p=1.0, stop_token_ids=[])[0]
    ref = teacher_forced_logprobs(ls.learner, long_prompt + out.token_ids)[-len(out.token_ids):]
    assert (torch.tensor(out.logprobs) - ref).abs().max() < TOL


def test_partial_weight_file_is_rejected_and_policy_kept(engine: Engine, learner_state: LearnerState,
                                                          tmp_path) -> None:
    ls = learner_state
    seq = ls.ids(PYTHON_PROMPT + PYTHON_TARGET)
    _load(engine, ls.base_weights, 0)
    before = engine.sequence_logprobs([seq])[0]
    partial = {k: v for k, v in ls.learner.state_dict().items() if k != "model.norm.weight"}
    path = save_weights_safetensors(partial, tmp_path / "partial.safetensors")
    with pytest.raises(ValueError, match=r"missing \['model.norm.weight'\]"):
        engine.update_weights(str(path), version=5)
    assert engine.version == 0
    assert engine.sequence_logprobs([seq])[0] == pytest.approx(before, abs=TOL)


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_sampled_logprobs_match_learner_forward(engine: Engine, learner_state: LearnerState,
                                                temperature: float, top_p: float) -> None:
    """Behaviour log-probs are those of the unmodified policy, whatever temperature / top-p sampled them."""
    ls = learner_state
    _load(engine, ls.trained_weights, 1)
    prompts = _prompts(ls)
    outs = engine.generate([GenerationRequest(p, 20) for p in prompts], temperature=temperature, top_p=top_p,
                           stop_token_ids=[ls.tok("</answer>")], seed=11)
    for p, o in zip(prompts, outs):
        assert o.token_ids and o.logprobs is not None
        ref = teacher_forced_logprobs(ls.learner, p + o.token_ids)[-len(o.token_ids):]
        assert (torch.tensor(o.logprobs) - ref).abs().max() < TOL


def test_sequence_logprobs_batch(engine: Engine, learner_state: LearnerState) -> None:
    ls = learner_state
    _load(engine, ls.trained_weights, 1)
    seqs = [ls.ids(PYTHON_PROMPT + PYTHON_TARGET), ls.ids("Q"), ls.ids(ANSWER_PROMPT)]
    got = engine.sequence_logprobs(seqs)
    assert [len(g) for g in got] == [len(s) - 1 for s in seqs]
    for s, g in zip(seqs, got):
        if len(s) > 1:
            assert (torch.tensor(g) - teacher_forced_logprobs(ls.learner, s)).abs().max() < TOL
