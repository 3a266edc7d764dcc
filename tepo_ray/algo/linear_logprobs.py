"""Chunked, recomputing log-probs (and entropies) of an output head: no [N, V] logits tensor.

`linear_logprobs(hidden, weight, bias, targets)` is

    logits = (hidden @ weight.T + bias) / temperature          # [N, V], float32
    logprob_t = logits[t, target_t] - logsumexp(logits[t])     # [N]
    H_t = logsumexp(logits[t]) - Σ_v softmax(logits[t])_v logits[t, v]   # [N] (no grad)

computed `chunk_size` rows at a time. Only `logsumexp` ([N]) is saved for backward;
backward recomputes each chunk's logits and forms

    d logprob_t / d logits[t] = (onehot(target_t) - softmax(logits[t])) / temperature

so peak extra memory is O(chunk_size x V) instead of O(N x V) — the same idea as
Liger-Kernel's fused linear cross-entropy and torchtune's chunked CE, written in
plain torch so it runs on CPU as well as GPU (Liger's kernels are Triton/GPU only).
The matmul runs in the input dtype (bf16 on GPU) and everything after it in fp32,
the same numerics as `head(rows).float()`.

Entropies are returned detached: TEPO uses the behaviour-policy entropies from
the scorer, never an entropy gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["linear_logprobs"]


def _chunk_logits(h: Tensor, weight: Tensor, bias: Tensor | None, temperature: float) -> Tensor:
    logits = torch.nn.functional.linear(h, weight, bias).float()  # [c, V]
    if temperature != 1.0:
        logits = logits / temperature
    return logits


class _LinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk_size, with_entropy):  # type: ignore[override]
        n = hidden.shape[0]
        logprobs = torch.empty(n, dtype=torch.float32, device=hidden.device)  # [N]
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)  # [N]
        entropy = torch.empty(n if with_entropy else 0, dtype=torch.float32, device=hidden.device)  # [N]
        with torch.no_grad():
            for s in range(0, n, chunk_size):
                e = min(s + chunk_size, n)
                logits = _chunk_logits(hidden[s:e], weight, bias, temperature)  # [c, V]
                z = torch.logsumexp(logits, dim=-1)  # [c]
                lse[s:e] = z
                logprobs[s:e] = logits.gather(-1, targets[s:e, None]).squeeze(-1) - z
                if with_entropy:
                    p = torch.softmax(logits, dim=-1)  # [c, V]
                    entropy[s:e] = z - (p * logits).sum(-1)
                del logits
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.temperature = temperature
        ctx.chunk_size = chunk_size
        ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, _grad_entropy):  # type: ignore[override]
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        t, c = ctx.temperature, ctx.chunk_size
        n = hidden.shape[0]
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        grad_h = torch.empty_like(hidden) if need_h else None  # [N, H]
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None  # [V, H]
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None  # [V]
        for s in range(0, n, c):
            e = min(s + c, n)
            with torch.no_grad():
                logits = _chunk_logits(hidden[s:e], weight, bias, t)  # [c, V]
                # d lp / d logits = onehot - softmax, times the incoming grad, / temperature
                g = torch.exp(logits - lse[s:e, None]).neg_()  # [c, V] = -softmax
                del logits
                g.scatter_add_(-1, targets[s:e, None], torch.ones(e - s, 1, dtype=g.dtype, device=g.device))
                g.mul_(grad_logprobs[s:e, None].float() / t)
                if need_h:
                    grad_h[s:e] = (g.to(weight.dtype) @ weight).to(hidden.dtype)
                if need_w:
                    grad_w.addmm_(g.t(), hidden[s:e].float())
                if need_b:
                    grad_b.add_(g.sum(0))
                del g
        return (
            grad_h,
            grad_w.to(weight.dtype) if grad_w is not None else None,
            grad_b.to(bias.dtype) if grad_b is not None else None,
            None, None, None, None,
        )


def linear_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    with_entropy: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Differentiable log pi(target | hidden) through the output head, chunked over rows.

    Args:
        hidden: ``[N, H]`` final hidden states (after the last norm).
        weight: ``[V, H]`` output-head weight (``lm_head.weight``); ``bias`` ``[V]`` or None.
        targets: ``[N]`` long token ids.
        temperature: logits are divided by it (the sampling distribution).
        chunk_size: rows per chunk; peak extra memory is ~3 x chunk_size x V x 4 bytes.

    Returns:
        ``(logprobs [N] float32, entropy [N] float32 detached or None)``; gradients flow to
        ``hidden``, ``weight`` and ``bias``.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"expected hidden [N, H] and weight [V, H]; got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets shape {tuple(targets.shape)} does not match hidden rows {hidden.shape[0]}")
    lp, ent = _LinearLogprobs.apply(hidden, weight, bias, targets.long(), float(temperature), int(chunk_size),
                                    bool(with_entropy))
    return lp, (ent if with_entropy else None)
