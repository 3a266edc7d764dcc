"""`algo.linear_logprobs` (chunked, recomputing output head) against the naive full-logits path."""

from __future__ import annotations

import pytest
import torch

from tepo_ray.algo.linear_logprobs import linear_logprobs
from tepo_ray.trainer.batching import make_token_batch, token_logprobs
from tepo_ray.trainer.checkpoint import load_policy


def _naive(hidden, weight, bias, targets, temperature):
    logits = torch.nn.functional.linear(hidden, weight, bias).float() / temperature  # [N, V]
    lp = -torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    p = torch.softmax(logits, -1)
    ent = torch.logsumexp(logits, -1) - (p * logits).sum(-1)
    return lp, ent


@pytest.mark.parametrize("chunk,temperature,use_bias", [(1, 1.0, False), (7, 0.7, True), (1000, 1.3, False)])
def test_values_and_gradients_match_full_logits(chunk: int, temperature: float, use_bias: bool) -> None:
    g = torch.Generator().manual_seed(0)
    n, h, v = 23, 16, 97
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64)
    bias = torch.randn(v, generator=g, dtype=torch.float64) if use_bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    upstream = torch.randn(n, generator=g, dtype=torch.float32)  # a non-uniform dL/dlogprob

    leaves = [t.clone().requires_grad_() for t in (hidden, weight, *( [bias] if use_bias else []))]
    lp, ent = linear_logprobs(leaves[0], leaves[1], targets, bias=leaves[2] if use_bias else None,
                              temperature=temperature, chunk_size=chunk, with_entropy=True)
    (lp * upstream).sum().backward()

    ref_leaves = [t.clone().requires_grad_() for t in (hidden, weight, *( [bias] if use_bias else []))]
    ref_lp, ref_ent = _naive(ref_leaves[0], ref_leaves[1], ref_leaves[2] if use_bias else None, targets, temperature)
    (ref_lp * upstream).sum().backward()

    torch.testing.assert_close(lp, ref_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, ref_ent.detach(), rtol=1e-5, atol=1e-5)
    assert not ent.requires_grad
    for a, b in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5)


def test_gradcheck_double() -> None:
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(9, 4, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 9, (5,), generator=g)
    # float32 logits inside: compare to finite differences with a loose tolerance
    assert torch.autograd.gradcheck(
        lambda hh, ww: linear_logprobs(hh, ww, targets, chunk_size=2)[0], (hidden, weight), eps=1e-3, atol=1e-2,
        rtol=1e-2,
    )


def test_bad_shapes_are_rejected() -> None:
    with pytest.raises(ValueError, match="hidden"):
        linear_logprobs(torch.zeros(3, 4), torch.zeros(5, 6), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="targets"):
        linear_logprobs(torch.zeros(3, 4), torch.zeros(5, 4), torch.zeros(2, dtype=torch.long))


def test_model_gradients_match_naive_forward_and_gradient_checkpointing(tiny_model: str) -> None:
    """Whole tiny Qwen2: chunked log-probs' parameter gradients equal those of `model(...).logits`."""
    ids = [[3, 5, 7, 9, 11, 13, 2, 4], [6, 8, 10, 12, 14]]
    masks = [[0, 0, 1, 1, 1, 0, 1, 1], [0, 1, 1, 1, 0]]
    batch = make_token_batch(ids, masks, pad_id=0)
    grads = []
    for variant in ("chunked", "naive", "checkpointed"):
        model = load_policy(tiny_model)
        model.train()
        if variant == "checkpointed":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if variant == "naive":
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
            lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
            loss = -(lp * batch.loss_mask[:, 1:]).sum()
        else:
            lp, _ = token_logprobs(model, batch, chunk_size=3)
            loss = -(lp * batch.loss_mask).sum()
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for other in grads[1:]:
        for name, g in grads[0].items():
            torch.testing.assert_close(g, other[name], rtol=1e-4, atol=1e-5, msg=name)
