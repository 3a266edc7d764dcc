"""EntropyScorer: entropies, behaviour log-probs and ΔH against a direct forward pass computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from tepo_ray.config import AlgoConfig
from tepo_ray.models.tiny import save_weights_safetensors
from tepo_ray.records import RecordError
from tepo_ray.trainer.checkpoint import load_policy, weight_file_path
from tepo_ray.trainer.scorer import EntropyScorer

from trainer_factories import make_trajectory


def _direct(model_path_or_model, token_ids: list[int]) -> tuple[list[float], list[float]]:
    """Per-token (H_t, log p(token_t)) from one plain forward of the whole sequence, float64."""
    model = load_policy(model_path_or_model) if isinstance(model_path_or_model, str) else model_path_or_model
    with torch.no_grad():
        logits = model(torch.tensor([token_ids])).logits[0].double()  # [T, V]
    logp = logits.log_softmax(-1)
    ent = [0.0] + (-(logp.exp() * logp).sum(-1))[:-1].tolist()  # position t from logits t-1
    lp = [0.0] + [logp[t - 1, token_ids[t]].item() for t in range(1, len(token_ids))]
    return ent, lp


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


@pytest.mark.parametrize("window", [None, 3])
def test_delta_entropy_matches_hand_computation(tiny_model: str, window: int | None) -> None:
    traj = make_trajectory(uid="t", prompt_len=5, gen_lens=(6, 8, 5), obs_lens=(4, 3), seed=3)
    other = make_trajectory(uid="u", prompt_len=9, gen_lens=(3,), obs_lens=(), seed=4)  # forces padding
    cfg = AlgoConfig(entropy_window=window, entropy_chunk_size=4)
    scorer = EntropyScorer(tiny_model, algo_cfg=cfg, micro_batch_size=2)
    scorer.score([traj, other])

    ent, lp = _direct(tiny_model, traj.token_ids)
    for t, m in enumerate(traj.loss_mask):
        if m:
            assert traj.entropies[t] == pytest.approx(ent[t], abs=1e-5)
            assert traj.behaviour_logprobs[t] == pytest.approx(lp[t], abs=1e-5)
        else:
            assert traj.entropies[t] == 0.0 and traj.behaviour_logprobs[t] == 0.0

    w = window or 10**9
    seg_means = [_mean(ent[s.start : min(s.end, s.start + w)]) for s in traj.segments]
    for k, call in enumerate(traj.tool_calls):
        expected = seg_means[k + 1] - seg_means[k]
        assert call.delta_entropy == pytest.approx(expected, abs=1e-5)
        assert call.entropy_decreased == (expected < 0)
    assert traj.meta["scored_versions"] == [0]
    assert traj.meta["segment_entropy"] == pytest.approx(seg_means, abs=1e-5)


def test_trajectory_cut_after_call_has_undefined_delta(tiny_model: str) -> None:
    traj = make_trajectory(uid="cut", gen_lens=(5, 6), obs_lens=(3, 4), seed=5)  # no segment after call 1
    EntropyScorer(tiny_model, algo_cfg=AlgoConfig()).score([traj])
    assert traj.tool_calls[0].delta_entropy is not None
    assert traj.tool_calls[1].delta_entropy is None
    assert traj.tool_calls[1].entropy_decreased is False


def test_scores_each_token_with_the_version_that_sampled_it(tiny_model: str, tmp_path) -> None:
    weights = tmp_path / "weights"
    models = {}
    for v in (1, 2):
        m = load_policy(tiny_model)
        torch.manual_seed(v)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.1 * torch.randn_like(p))
        save_weights_safetensors(m, weight_file_path(weights, v))
        models[v] = m
    t1 = make_trajectory(uid="a", version=1, seed=1)
    t2 = make_trajectory(uid="b", version=2, seed=2)
    n_gen = sum(make_trajectory(uid="x", seed=9).loss_mask)
    t12 = make_trajectory(uid="c", gen_versions=[1] * 3 + [2] * (n_gen - 3), seed=9)  # spans v1 and v2

    scorer = EntropyScorer(tiny_model, algo_cfg=AlgoConfig(), weights_dir=weights)
    scorer.score([t2, t1, t12])
    assert scorer.loads == 2  # one switch per distinct version
    for traj in (t1, t2, t12):
        for v in (1, 2):
            ent, lp = _direct(models[v], traj.token_ids)
            gen = [t for t, (m, tv) in enumerate(zip(traj.loss_mask, traj.versions)) if m and tv == v]
            assert [traj.entropies[t] for t in gen] == pytest.approx([ent[t] for t in gen], abs=1e-5)
            assert [traj.behaviour_logprobs[t] for t in gen] == pytest.approx([lp[t] for t in gen], abs=1e-5)
    assert [t1.meta["scored_versions"], t2.meta["scored_versions"], t12.meta["scored_versions"]] == [[1], [2], [1, 2]]
    assert t12.meta["spans_versions"] == [1, 2]
    # the v2 turn differs from what v1 (the trajectory's oldest version) would have given it
    lp1 = _direct(models[1], t12.token_ids)[1]
    late = [t for t, (m, tv) in enumerate(zip(t12.loss_mask, t12.versions)) if m and tv == 2]
    assert max(abs(t12.behaviour_logprobs[t] - lp1[t]) for t in late) > 1e-3
    # version 0 is the model directory itself
    t0 = make_trajectory(uid="z", version=0, seed=1)
    scorer.score([t0])
    lp0 = _direct(tiny_model, t0.token_ids)[1]
    assert t0.behaviour_logprobs == pytest.approx([x * m for x, m in zip(lp0, t0.loss_mask)], abs=1e-5)


def test_load_weights_registers_and_switches(tiny_model: str, tmp_path) -> None:
    m = load_policy(tiny_model)
    with torch.no_grad():
        m.lm_head.weight.mul_(3.0)
    path = save_weights_safetensors(m, tmp_path / "custom.safetensors")
    scorer = EntropyScorer(tiny_model, algo_cfg=AlgoConfig(), cache_size=2)
    assert scorer.load_weights(path, 7) == 7
    traj = make_trajectory(uid="a", version=7, seed=1)
    scorer.score([traj])
    gen = [t for t, mm in enumerate(traj.loss_mask) if mm]
    assert [traj.entropies[t] for t in gen] == pytest.approx([_direct(m, traj.token_ids)[0][t] for t in gen], abs=1e-5)
    with pytest.raises(FileNotFoundError, match="behaviour version 5"):
        scorer.score([make_trajectory(uid="b", version=5)])


def test_rejects_bad_records(tiny_model: str) -> None:
    scorer = EntropyScorer(tiny_model, algo_cfg=AlgoConfig())
    bad = make_trajectory(uid="bad")
    bad.loss_mask = bad.loss_mask[:-1]
    with pytest.raises(RecordError, match="loss_mask"):
        scorer.score([bad])
    big = make_trajectory(uid="big")
    big.token_ids[-1] = 10_000
    with pytest.raises(RecordError, match="vocabulary"):
        scorer.score([big])
    first = make_trajectory(uid="first", prompt_len=0)
    with pytest.raises(ValueError, match="first token"):
        scorer.score([first])


def test_entropies_are_finite_and_bounded(tiny_model: str) -> None:
    traj = make_trajectory(uid="b", gen_lens=(20, 20), obs_lens=(5,), seed=11)
    EntropyScorer(tiny_model, algo_cfg=AlgoConfig(entropy_chunk_size=1)).score([traj])
    gen = [e for e, m in zip(traj.entropies, traj.loss_mask) if m]
    assert all(0.0 < e <= math.log(128) + 1e-5 for e in gen)
    assert all(lp < 0 for lp, m in zip(traj.behaviour_logprobs, traj.loss_mask) if m)


# --------------------------------------------------------------------------- which tokens enter ΔH
def _hand_built(tok, turns: list[list[tuple[str, str]]], observations: list[str]):
    """A trajectory laid out piece by piece; returns it and, per turn, the positions of each piece kind.

    `turns[k]` is a list of (kind, text) pieces of generated turn k; observation k follows turn k.
    Pieces are encoded one by one, so which positions hold <think> content is known by construction.
    """
    from tepo_ray.agent.spans import turn_spans
    from tepo_ray.records import Segment, ToolCall, Trajectory

    ids = tok.encode("Question: hi\n", add_special_tokens=False)
    mask = [0] * len(ids)
    segments, calls, kinds = [], [], []
    for k, turn in enumerate(turns):
        start = len(ids)
        where: dict[str, list[int]] = {}
        for kind, text in turn:
            piece = tok.encode(text, add_special_tokens=False)
            where.setdefault(kind, []).extend(range(len(ids), len(ids) + len(piece)))
            ids += piece
        mask += [1] * (len(ids) - start)
        seg = Segment(start, len(ids), k if k < len(observations) else None)
        seg.reasoning_spans, seg.nontag_spans = turn_spans(tok, ids[start:], offset=start)
        segments.append(seg)
        kinds.append(where)
        if k < len(observations):
            tool = "invalid" if any(kind == "bad" for kind, _ in turn) else "python"
            calls.append(ToolCall(tool=tool, argument="" if tool == "invalid" else "x", segment_index=k,
                                  error="malformed" if tool == "invalid" else None))
            obs = tok.encode(f"<result>{observations[k]}</result>", add_special_tokens=False)
            ids += obs
            mask += [0] * len(obs)
    traj = Trajectory(uid="hand", group_id="g", prompt_id="p", token_ids=ids, loss_mask=mask,
                      versions=[0 if m else -1 for m in mask], prompt_len=mask.index(1), segments=segments,
                      tool_calls=calls)
    return traj.validate(), kinds


@pytest.mark.parametrize("tags_as_tokens", [True, False], ids=["tags-one-token", "tags-split"])
def test_hand_built_trajectory_segments_use_only_think_content(tags_as_tokens: bool) -> None:
    from span_tokenizers import bpe_tokenizer

    from tepo_ray.trainer.scorer import entropy_positions, fill_delta_entropy

    tok = bpe_tokenizer(tags_as_tokens=tags_as_tokens)
    turns = [
        [("tag", "<think>"), ("think", "about 1.2e5 too hard"), ("tag", "</think>"), ("tag", "<python>"),
         ("code", "print(123*456)"), ("tag", "</python>")],
        [("tag", "<think>"), ("think", "the tool says 56088"), ("tag", "</think>"), ("tag", "<answer>"),
         ("answer", "56088"), ("tag", "</answer>")],
    ]
    traj, kinds = _hand_built(tok, turns, ["56088"])
    for seg, where in zip(traj.segments, kinds):
        pos, rule = entropy_positions(seg, span="think")
        assert rule == "think"
        if tags_as_tokens:  # every tag is one token: the think positions are exactly the think pieces
            assert pos == where["think"]
        else:  # a token may straddle '>' and the first letters; never a tag, code or answer token
            assert set(pos) <= set(where["think"]) and len(pos) >= len(where["think"]) - 2
        assert not set(pos) & set(where.get("code", []) + where.get("answer", []))
        turn_pos, rule = entropy_positions(seg, span="turn")
        assert turn_pos == list(range(seg.start, seg.end)) and rule == "turn"

    # Entropies written by hand: ΔH is the difference of the think means, whatever the other tokens hold.
    traj.entropies = [0.0] * len(traj.token_ids)
    for t in range(len(traj.token_ids)):
        if traj.loss_mask[t]:
            traj.entropies[t] = 100.0  # tags, code, answer: would dominate if they were counted
    pos0, _ = entropy_positions(traj.segments[0], span="think")
    pos1, _ = entropy_positions(traj.segments[1], span="think")
    for t in pos0:
        traj.entropies[t] = 2.0
    for t in pos1:
        traj.entropies[t] = 0.5
    fill_delta_entropy(traj, window=None, span="think")
    assert traj.tool_calls[0].delta_entropy == pytest.approx(0.5 - 2.0)
    assert traj.tool_calls[0].entropy_decreased is True
    fill_delta_entropy(traj, window=2, span="think")  # the window counts think tokens only
    assert traj.tool_calls[0].delta_entropy == pytest.approx(0.5 - 2.0)
    fill_delta_entropy(traj, window=None, span="turn")
    assert traj.tool_calls[0].delta_entropy != pytest.approx(0.5 - 2.0)


def test_segment_without_think_falls_back_to_its_non_tag_tokens_and_malformed_calls_get_no_delta() -> None:
    from span_tokenizers import bpe_tokenizer

    from tepo_ray.trainer.scorer import entropy_positions, fill_delta_entropy

    tok = bpe_tokenizer(tags_as_tokens=True)
    turns = [
        [("tag", "<python>"), ("code", "print(1+2)"), ("tag", "</python>")],  # no <think>: fallback
        [("tag", "<think>"), ("think", "hmm"), ("tag", "</think>"), ("tag", "<python>"), ("bad", ""),
         ("tag", "</python>")],  # empty call: malformed
        [("tag", "<think>"), ("think", "done"), ("tag", "</think>"), ("tag", "<answer>"), ("answer", "3"),
         ("tag", "</answer>")],
    ]
    traj, kinds = _hand_built(tok, turns, ["3", "error: empty <python> call"])
    pos, rule = entropy_positions(traj.segments[0], span="think")
    assert rule == "nontag" and pos == kinds[0]["code"]
    traj.entropies = [1.0 if m else 0.0 for m in traj.loss_mask]
    fill_delta_entropy(traj, window=None, span="think")
    assert traj.meta["entropy_span_rule"] == ["nontag", "think", "think"]
    assert traj.tool_calls[0].delta_entropy == pytest.approx(0.0)
    assert traj.tool_calls[1].malformed
    assert traj.tool_calls[1].delta_entropy is None and traj.tool_calls[1].entropy_decreased is False
