"""SFT warm-start: the loss falls, masked tokens never matter, the output is a complete model dir."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from tepo_ray.config import ModelConfig
from tepo_ray.trainer.batching import make_token_batch
from tepo_ray.trainer.checkpoint import load_policy
from tepo_ray.trainer.sft import LRSchedule, sft_loss, sft_train

from trainer_factories import VOCAB, make_trajectory


def _examples(n: int, *, seed: int = 0, vocab: int = VOCAB) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = [rng.randrange(1, vocab) for _ in range(4)]
        call = [rng.randrange(1, vocab) for _ in range(6)]
        obs = [rng.randrange(1, vocab) for _ in range(5)]
        answer = [rng.randrange(1, vocab) for _ in range(6)]
        out.append({
            "token_ids": prompt + call + obs + answer,
            "loss_mask": [0] * 4 + [1] * 6 + [0] * 5 + [1] * 6,
        })
    return out


def test_loss_decreases_on_repeated_data_and_saves_model(tiny_model: str, tmp_path: Path) -> None:
    data = _examples(4)
    out = tmp_path / "sft"
    metrics = sft_train(tiny_model, examples=data * 4, steps=30, lr=3e-3, batch_size=4, out_dir=out,
                        seed=0, progress=False, warmup_steps=2)
    assert metrics["loss_last"] < 0.5 * metrics["loss_first"]
    assert len(metrics["loss_history"]) == 30
    assert metrics["tokens"] == 30 * 4 * 12
    saved = json.loads((out / "sft_metrics.json").read_text())
    assert saved["loss_last"] == metrics["loss_last"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary dir left

    # The saved model reproduces the low loss, the initial one does not.
    batch = make_token_batch([d["token_ids"] for d in data], [d["loss_mask"] for d in data])
    with torch.no_grad():
        trained = float(sft_loss(load_policy(out), batch))
        initial = float(sft_loss(load_policy(tiny_model), batch))
    assert trained < 0.5 * initial


def test_masked_tokens_do_not_influence_loss_or_gradient(tiny_model: str) -> None:
    model = load_policy(tiny_model)
    traj = make_trajectory(uid="a", prompt_len=4, gen_lens=(6, 5), obs_lens=(4,), seed=1)
    # Append a trailing observation (masked) whose tokens we can change freely.
    ids = traj.token_ids + [7, 8, 9, 10]
    mask = traj.loss_mask + [0, 0, 0, 0]

    def loss_and_grad(token_ids, loss_mask):
        model.zero_grad(set_to_none=True)
        loss = sft_loss(model, make_token_batch([token_ids], [loss_mask]))
        loss.backward()
        return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    base_loss, base_grad = loss_and_grad(ids, mask)
    changed = ids[:-4] + [99, 98, 97, 96]
    loss2, grad2 = loss_and_grad(changed, mask)
    assert loss2 == base_loss
    assert all(torch.equal(base_grad[n], grad2[n]) for n in base_grad)

    # Padding next to a shorter sequence does not change that sequence's loss either.
    short = make_trajectory(uid="b", prompt_len=3, gen_lens=(4,), obs_lens=(), seed=2)
    with torch.no_grad():
        alone = float(sft_loss(model, make_token_batch([short.token_ids], [short.loss_mask])))
        n_short, n_long = sum(short.loss_mask), sum(mask)
        both = float(sft_loss(model, make_token_batch([short.token_ids, ids], [short.loss_mask, mask])))
        long_only = float(sft_loss(model, make_token_batch([ids], [mask])))
    assert both == pytest.approx((alone * n_short + long_only * n_long) / (n_short + n_long), abs=1e-6)

    # Sanity: the test can fail — training on an observation token does change the loss.
    unmasked = list(mask)
    unmasked[-1] = 1
    assert loss_and_grad(changed, unmasked)[0] != loss2


def test_tokenizer_is_copied_with_the_model(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from tepo_ray.models.tiny import build_tiny_model

    cfg = ModelConfig(hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64,
                      vocab_size=300, max_position_embeddings=128)
    corpus = ["what is 12 * 34? <python>print(12*34)</python><result>408</result><answer>408</answer>"] * 20
    src = build_tiny_model(cfg, out_dir=tmp_path / "tiny", corpus_texts=corpus)
    tok = AutoTokenizer.from_pretrained(src)
    ids = tok("what is 12 * 34?")["input_ids"] + tok("<python>print(12*34)</python>")["input_ids"]
    n_prompt = len(tok("what is 12 * 34?")["input_ids"])
    example = (ids, [0] * n_prompt + [1] * (len(ids) - n_prompt))
    out = tmp_path / "warm"
    sft_train(src, examples=[example], steps=2, lr=1e-3, batch_size=2, out_dir=out, progress=True)
    sft_train(src, examples=[example], steps=1, lr=1e-3, batch_size=1, out_dir=out, progress=False)  # overwrite
    assert AutoTokenizer.from_pretrained(out)("<answer>")["input_ids"] == tok("<answer>")["input_ids"]
    assert load_policy(out).config.vocab_size == len(tok)


def test_bad_examples_name_the_index(tiny_model: str, tmp_path: Path) -> None:
    good = _examples(1)[0]
    with pytest.raises(ValueError, match=r"examples\[1\]: token_ids has 3 entries, loss_mask 2"):
        sft_train(tiny_model, examples=[good, {"token_ids": [1, 2, 3], "loss_mask": [0, 1]}], steps=1, lr=1e-3,
                  batch_size=1, out_dir=tmp_path / "o", progress=False)
    with pytest.raises(ValueError, match=r"examples\[0\].*all 0"):
        sft_train(tiny_model, examples=[([1, 2], [0, 0])], steps=1, lr=1e-3, batch_size=1,
                  out_dir=tmp_path / "o", progress=False)
    with pytest.raises(ValueError, match="schedule"):
        LRSchedule("exponential", total_steps=3)


def test_lr_schedules() -> None:
    cos = LRSchedule("cosine", total_steps=10, warmup_steps=2)
    assert [cos(0), cos(1)] == [0.5, 1.0]
    assert cos(2) == pytest.approx(1.0)
    assert cos(7) == pytest.approx(0.5 * (1 + math.cos(5 / 8 * math.pi)))
    assert cos(10) == pytest.approx(0.0, abs=1e-12)
    lin = LRSchedule("linear", total_steps=4, min_ratio=0.2)
    assert [lin(s) for s in range(5)] == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2])
