"""Clipped surrogate policy loss: worked values, masking, micro-batching, a real tiny model."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tepo_ray.algo import policy_loss

CLIP = dict(clip_low=0.2, clip_high=0.28)


def test_ratio_one_gives_minus_mean_advantage_and_its_gradient():
    torch.manual_seed(0)
    lp = torch.randn(3, 5, requires_grad=True)
    adv = torch.randn(3, 5)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    loss, metrics = policy_loss(logprobs=lp, old_logprobs=lp.detach(), advantages=adv, loss_mask=mask, **CLIP)
    n = int(mask.sum())
    assert float(loss.detach()) == pytest.approx(-float((adv * mask).sum()) / n, rel=1e-6)
    loss.backward()
    torch.testing.assert_close(lp.grad, -adv * mask / n)
    assert metrics["ratio_mean"] == pytest.approx(1.0) and metrics["clip_fraction"] == 0.0
    assert metrics["approx_kl"] == pytest.approx(0.0, abs=1e-7) and metrics["num_tokens"] == n


def test_clipping_worked_example():
    #  token  ratio  A    unclipped  clipped       min      L_t     grad of L_t wrt log-prob
    #  0      1.5    +1   1.5        1.28          1.28     -1.28   0 (clipped)
    #  1      0.5    -1   -0.5       -0.8          -0.8      0.8    0 (clipped)
    #  2      0.5    +1   0.5        0.8           0.5      -0.5    -ratio*A/4 = -0.125
    #  3      1.5    -1   -1.5       -1.28         -1.5      1.5    -ratio*A/4 = +0.375
    ratio = torch.tensor([[1.5, 0.5, 0.5, 1.5]])
    old = torch.tensor([[-1.0, -2.0, -0.5, -3.0]])
    lp = (old + ratio.log()).requires_grad_(True)
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    loss, m = policy_loss(logprobs=lp, old_logprobs=old, advantages=adv, loss_mask=torch.ones(1, 4), **CLIP)
    assert float(loss.detach()) == pytest.approx((-1.28 + 0.8 - 0.5 + 1.5) / 4, rel=1e-6)
    loss.backward()
    torch.testing.assert_close(lp.grad, torch.tensor([[0.0, 0.0, -0.125, 0.375]]))
    assert m["clip_fraction"] == pytest.approx(0.5)
    assert m["ratio_mean"] == pytest.approx(1.0) and m["ratio_max"] == pytest.approx(1.5)
    k3 = lambda r: r - 1 - math.log(r)  # noqa: E731
    assert m["approx_kl"] == pytest.approx((2 * k3(1.5) + 2 * k3(0.5)) / 4, rel=1e-5)


def test_kl_to_reference_k3():
    lp = torch.zeros(1, 3, requires_grad=True)
    ref = torch.tensor([[math.log(2.0), 0.0, -1.0]])  # d = ref - lp
    mask = torch.tensor([[1, 1, 0]])
    k3 = [2.0 - math.log(2.0) - 1.0, 0.0]  # exp(d) - d - 1 for d = log 2, 0
    loss, m = policy_loss(logprobs=lp, old_logprobs=lp.detach(), advantages=torch.zeros(1, 3), loss_mask=mask,
                          ref_logprobs=ref, kl_coef=0.1, **CLIP)
    assert float(loss.detach()) == pytest.approx(0.1 * sum(k3) / 2, rel=1e-6)
    assert m["kl_ref"] == pytest.approx(sum(k3) / 2, rel=1e-6)
    loss.backward()  # d/dlp of 0.1*(exp(ref-lp) - (ref-lp) - 1)/2 = 0.1*(1 - exp(d))/2
    torch.testing.assert_close(lp.grad, torch.tensor([[0.1 * (1 - 2.0) / 2, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="ref_logprobs"):
        policy_loss(logprobs=lp, old_logprobs=lp, advantages=lp, loss_mask=mask, kl_coef=0.1, **CLIP)


def test_sequence_aggregations_worked_example():
    # ratio 1 -> L_t = -A_t.  seq0: L = (1, 3); seq1: L = (4); seq2: no trained token.
    adv = torch.tensor([[-1.0, -3.0], [-4.0, 99.0], [5.0, 5.0]])
    mask = torch.tensor([[1, 1], [1, 0], [0, 0]])
    lp = torch.zeros(3, 2)
    kw = dict(logprobs=lp, old_logprobs=lp, advantages=adv, loss_mask=mask, **CLIP)
    assert float(policy_loss(**kw, loss_agg="token_mean")[0]) == pytest.approx(8 / 3)
    assert float(policy_loss(**kw, loss_agg="seq_mean_token_mean")[0]) == pytest.approx((2 + 4) / 2)
    assert float(policy_loss(**kw, loss_agg="seq_mean_token_sum")[0]) == pytest.approx((4 + 4) / 2)
    with pytest.raises(ValueError, match=r"loss_agg='seq_sum' is unknown; expected one of \['token_mean'"):
        policy_loss(**kw, loss_agg="seq_sum")
    with pytest.raises(ValueError, match="advantages shape"):
        policy_loss(logprobs=lp, old_logprobs=lp, advantages=adv[:2], loss_mask=mask, **CLIP)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    poison=st.sampled_from([float("nan"), float("inf"), float("-inf"), 1e30]),
    agg=st.sampled_from(["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"]),
    with_ref=st.booleans(),
)
def test_masked_tokens_change_neither_loss_nor_gradient(seed, poison, agg, with_ref):
    g = torch.Generator().manual_seed(seed)
    B, T = 3, 6
    mask = torch.rand(B, T, generator=g) > 0.4
    mask[0, 0] = True
    base = dict(
        lp=torch.randn(B, T, generator=g) * 0.3 - 1,
        old=torch.randn(B, T, generator=g) * 0.3 - 1,
        adv=torch.randn(B, T, generator=g),
        ref=torch.randn(B, T, generator=g) * 0.3 - 1,
    )

    def run(values):
        lp = values["lp"].clone().requires_grad_(True)
        loss, _ = policy_loss(logprobs=lp, old_logprobs=values["old"], advantages=values["adv"], loss_mask=mask,
                              ref_logprobs=values["ref"] if with_ref else None, kl_coef=0.05 if with_ref else 0.0,
                              loss_agg=agg, **CLIP)
        loss.backward()
        return loss.detach(), lp.grad

    clean_loss, clean_grad = run(base)
    poisoned = {k: torch.where(mask, v, torch.full_like(v, poison)) for k, v in base.items()}
    loss, grad = run(poisoned)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    torch.testing.assert_close(loss, clean_loss)
    torch.testing.assert_close(grad, clean_grad)
    assert (grad[~mask] == 0).all()


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"])
def test_micro_batch_accumulation_equals_full_batch(agg):
    g = torch.Generator().manual_seed(3)
    B, T = 6, 7
    lp0 = torch.randn(B, T, generator=g) * 0.2 - 1
    old = lp0 + torch.randn(B, T, generator=g) * 0.3  # ratios on both sides of the clip range
    adv = torch.randn(B, T, generator=g)
    ref = lp0 + torch.randn(B, T, generator=g) * 0.1
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[4] = False  # a sequence with nothing to train
    kw = dict(loss_agg=agg, kl_coef=0.1, **CLIP)

    lp_full = lp0.clone().requires_grad_(True)
    full, _ = policy_loss(logprobs=lp_full, old_logprobs=old, advantages=adv, loss_mask=mask, ref_logprobs=ref, **kw)
    full.backward()

    lp_micro = lp0.clone().requires_grad_(True)
    n_tok = float(mask.sum())
    n_seq = float((mask.sum(-1) > 0).sum())
    total = torch.zeros(())
    for sl in (slice(0, 1), slice(1, 4), slice(4, 6)):  # uneven micro-batches
        part, _ = policy_loss(logprobs=lp_micro[sl], old_logprobs=old[sl], advantages=adv[sl], loss_mask=mask[sl],
                              ref_logprobs=ref[sl], num_tokens=n_tok, num_sequences=n_seq, **kw)
        part.backward()
        total = total + part.detach()
    torch.testing.assert_close(total, full.detach())
    torch.testing.assert_close(lp_micro.grad, lp_full.grad)


# ----------------------------------------------------------------------------- behaviour on a real model
def _tiny_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )
    return Qwen2ForCausalLM(cfg).float()


def _seq_logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids).logits[:, :-1].float()  # [1, T-1, V]
    return torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]  # [1, T-1]


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_one_step_moves_logprobs_in_the_advantage_direction(sign):
    model = _tiny_qwen2()
    ids = torch.tensor([[3, 17, 42, 8, 99, 23, 5, 61, 77, 12, 30, 4, 56, 88, 1, 9]])
    mask = torch.zeros(1, ids.shape[1] - 1)
    mask[:, 7:] = 1  # "response" tokens only
    with torch.no_grad():
        before = _seq_logprobs(model, ids)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    lp = _seq_logprobs(model, ids)
    loss, metrics = policy_loss(logprobs=lp, old_logprobs=before, advantages=torch.full_like(lp, sign),
                                loss_mask=mask, **CLIP)
    assert metrics["ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    opt.zero_grad()
    loss.backward()
    opt.step()
    with torch.no_grad():
        after = _seq_logprobs(model, ids)
    change = float(((after - before) * mask).sum())
    assert sign * change > 0.05, f"masked log-prob sum moved by {change:+.4f}, expected sign {sign:+}"
