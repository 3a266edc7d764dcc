"""Builders shared by the trainer tests: a real tiny Qwen2 on disk and hand-laid-out trajectories.

The model is random-init but with `initializer_range=0.2`, so token entropies
vary between ~3 and ~4.2 nats (with the default 0.02 every distribution is
near-uniform and ΔH would be ~1e-4, too small to test anything).
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from tepo_ray.records import Segment, ToolCall, Trajectory

VOCAB = 128


def build_tiny_qwen2(out_dir: Path, *, seed: int = 0, tie: bool = False) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=128,
        vocab_size=VOCAB,
        max_position_embeddings=256,
        initializer_range=0.2,
        tie_word_embeddings=tie,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg)
    model.save_pretrained(str(out_dir))
    return out_dir


def make_trajectory(
    *,
    uid: str,
    group_id: str = "g0",
    prompt_len: int = 5,
    gen_lens: tuple[int, ...] = (6, 7),
    obs_lens: tuple[int, ...] = (4,),
    version: int = 0,
    gen_versions: list[int] | None = None,
    seed: int = 0,
    score: float | None = None,
    answer: str | None = None,
    gold: list[str] | None = None,
    decreased: list[bool] | None = None,
) -> Trajectory:
    """[prompt][gen_0][obs_0][gen_1][obs_1]...: gen_k (k < #obs) ends with tool call k.

    len(gen_lens) is #calls + 1 (a final answer segment) or #calls (cut right after
    the last observation). `decreased` pre-fills I_{i,k} (as if scored) when given.
    """
    n_calls = len(obs_lens)
    if len(gen_lens) not in (n_calls, n_calls + 1):
        raise ValueError("gen_lens must have #calls or #calls + 1 entries")
    rng = random.Random(seed)
    ids = [rng.randrange(1, VOCAB) for _ in range(prompt_len)]
    mask = [0] * prompt_len
    segments, calls = [], []
    for k, g in enumerate(gen_lens):
        start = len(ids)
        ids += [rng.randrange(1, VOCAB) for _ in range(g)]
        mask += [1] * g
        is_call = k < n_calls
        segments.append(Segment(start=start, end=len(ids), tool_call_index=k if is_call else None))
        if is_call:
            calls.append(ToolCall(tool="python", argument=f"print({k})", observation="obs", segment_index=k))
            ids += [rng.randrange(1, VOCAB) for _ in range(obs_lens[k])]
            mask += [0] * obs_lens[k]
    if gen_versions is None:
        versions = [version if m else -1 for m in mask]
    else:
        it = iter(gen_versions)
        versions = [next(it) if m else -1 for m in mask]
    if decreased is not None:
        for c, d in zip(calls, decreased):
            c.entropy_decreased = d
            c.delta_entropy = -0.1 if d else 0.1
    return Trajectory(
        uid=uid,
        group_id=group_id,
        prompt_id=group_id,
        token_ids=ids,
        loss_mask=mask,
        versions=versions,
        prompt_len=prompt_len,
        segments=segments,
        tool_calls=calls,
        answer=answer,
        gold=gold if gold is not None else ["42"],
        score=score,
    ).validate()


def make_group(
    group_id: str, *, scores: list[float], seed: int = 0, version: int = 0, with_calls: bool = True
) -> list[Trajectory]:
    """A GRPO group with varied call counts (0..2 calls), lengths and scores."""
    out = []
    for j, s in enumerate(scores):
        n_calls = (j % 3) if with_calls else 0
        gen = tuple(4 + (j + k) % 4 for k in range(n_calls + 1))
        obs = tuple(3 + k for k in range(n_calls))
        out.append(
            make_trajectory(uid=f"{group_id}-{j}", group_id=group_id, prompt_len=4 + j % 2, gen_lens=gen,
                            obs_lens=obs, version=version, seed=seed * 100 + j, score=s)
        )
    return out


# Session fixtures shared by tests/trainer and tests/distributed (each conftest imports them).
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(build_tiny_qwen2(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture(scope="session")
def tiny_tied_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(build_tiny_qwen2(tmp_path_factory.mktemp("tiny_tied") / "model", tie=True))
