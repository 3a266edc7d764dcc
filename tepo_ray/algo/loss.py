"""Token-level clipped surrogate loss (DESIGN.md section 1, "Loss").

Per trainable token t, with ``ρ_t = exp(log π_θ(y_t) - log π_behaviour(y_t))``::

    L_t = -min(ρ_t A_t, clip(ρ_t, 1 - ε_low, 1 + ε_high) A_t) + β · k3_t
    k3_t = exp(ref_t - lp_t) - (ref_t - lp_t) - 1          (KL to the frozen reference)

aggregated over the masked tokens of the batch (``loss_agg``):

* ``token_mean``:           Σ_t L_t / N_tokens
* ``seq_mean_token_mean``:  mean over sequences of (Σ_t L_t / n_tokens(seq))
* ``seq_mean_token_sum``:   mean over sequences of Σ_t L_t

Sequences without a trainable token are not counted in the seq_* modes. For
micro-batching pass the global ``num_tokens`` (token_mean) or ``num_sequences``
(seq_* modes); the micro-batch losses then sum to the full-batch loss exactly.

Masked positions are replaced with ``torch.where`` *before* any arithmetic, so a
NaN / inf log-prob or advantage there changes neither the loss nor any gradient.
"""

from __future__ import annotations

import enum

import torch
from torch import Tensor

from .registry import PolicyLossName, register_policy_loss

__all__ = ["LossAgg", "policy_loss"]

KL_CLAMP = 10.0  # k3 per token is clamped to [0, KL_CLAMP] (as verl's low_var_kl)


class LossAgg(str, enum.Enum):
    TOKEN_MEAN = "token_mean"
    SEQ_MEAN_TOKEN_MEAN = "seq_mean_token_mean"
    SEQ_MEAN_TOKEN_SUM = "seq_mean_token_sum"


@register_policy_loss(PolicyLossName.CLIPPED)
def policy_loss(
    *,
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    loss_mask: Tensor,
    clip_low: float,
    clip_high: float,
    ref_logprobs: Tensor | None = None,
    kl_coef: float = 0.0,
    loss_agg: str = "token_mean",
    num_tokens: float | None = None,
    num_sequences: float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Clipped surrogate with optional k3 KL to a reference.

    Args:
        logprobs: ``[B, T]`` current policy log-probs (carry grad).
        old_logprobs: ``[B, T]`` behaviour-policy log-probs (the importance ratio's denominator).
        advantages: ``[B, T]`` per-token advantages.
        loss_mask: ``[B, T]`` 0/1 (or bool): which tokens are trained.
        clip_low / clip_high: ε_low, ε_high (ratio clipped to ``[1-ε_low, 1+ε_high]``).
        ref_logprobs: ``[B, T]`` frozen reference log-probs (needed when ``kl_coef > 0``).
        kl_coef: β.
        loss_agg: a :class:`LossAgg` name.
        num_tokens: token_mean divisor; default the mask sum of this (micro-)batch.
        num_sequences: seq_* divisor; default the sequences with a trainable token here.
    Returns:
        ``(loss, metrics)``: scalar loss, and floats ``loss``, ``kl_ref`` (mean k3 to
        the reference, 0 without one), ``clip_fraction`` (tokens where the clipped term is
        the active one), ``approx_kl`` (mean k3 of behaviour vs current:
        ``ρ - 1 - log ρ``), ``ratio_mean``, ``ratio_max``, ``num_tokens``. Means are over
        this call's masked tokens.
    """
    shape = logprobs.shape
    for name, t in (("old_logprobs", old_logprobs), ("advantages", advantages), ("loss_mask", loss_mask)):
        if t.shape != shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} must equal logprobs shape {tuple(shape)}")
    if ref_logprobs is not None and ref_logprobs.shape != shape:
        raise ValueError(f"ref_logprobs shape {tuple(ref_logprobs.shape)} must equal logprobs shape {tuple(shape)}")
    if kl_coef < 0:
        raise ValueError(f"kl_coef={kl_coef}: expected >= 0")
    if kl_coef > 0 and ref_logprobs is None:
        raise ValueError("kl_coef > 0 needs ref_logprobs (the frozen reference's log-probs)")
    if clip_low <= 0 or clip_high <= 0:
        raise ValueError(f"clip_low={clip_low}, clip_high={clip_high}: both must be > 0")
    try:
        agg = LossAgg(loss_agg)
    except ValueError:
        raise ValueError(f"loss_agg={loss_agg!r} is unknown; expected one of {[a.value for a in LossAgg]}") from None
    if logprobs.dim() < 1:
        raise ValueError("logprobs must be at least 1-D ([T] or [B, T])")
    if num_tokens is not None and num_tokens <= 0:
        raise ValueError(f"num_tokens={num_tokens}: expected > 0")
    if num_sequences is not None and num_sequences <= 0:
        raise ValueError(f"num_sequences={num_sequences}: expected > 0")

    mask = loss_mask.to(logprobs.device) > 0  # [B, T]
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    lp = torch.where(mask, logprobs, zero)  # [B, T] grad flows only through masked-in entries
    old = torch.where(mask, old_logprobs.to(lp.dtype), zero).detach()
    adv = torch.where(mask, advantages.to(lp.dtype), zero).detach()

    log_ratio = lp - old
    ratio = torch.exp(log_ratio)
    surr1 = ratio * adv
    surr2 = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * adv
    per_token = -torch.minimum(surr1, surr2)  # [B, T]
    kl_ref = None
    if ref_logprobs is not None:
        ref = torch.where(mask, ref_logprobs.to(lp.dtype), zero).detach()
        d = ref - lp
        kl_ref = torch.clamp(torch.exp(d) - d - 1.0, min=0.0, max=KL_CLAMP)  # [B, T]
        if kl_coef > 0:
            per_token = per_token + kl_coef * kl_ref
    per_token = torch.where(mask, per_token, zero)

    n_local = mask.sum()
    if agg is LossAgg.TOKEN_MEAN:
        denom = float(num_tokens) if num_tokens is not None else n_local.clamp_min(1)
        loss = per_token.sum() / denom
    else:
        seq_tokens = mask.sum(-1)  # [B]
        has_tokens = seq_tokens > 0
        seq_sum = per_token.sum(-1)  # [B]
        if agg is LossAgg.SEQ_MEAN_TOKEN_MEAN:
            seq_val = torch.where(has_tokens, seq_sum / seq_tokens.clamp_min(1), zero)
        else:
            seq_val = seq_sum
        denom = float(num_sequences) if num_sequences is not None else has_tokens.sum().clamp_min(1)
        loss = seq_val.sum() / denom

    with torch.no_grad():
        n = max(int(n_local), 1)

        def mmean(x: Tensor) -> float:
            return float(torch.where(mask, x, zero).sum()) / n

        r = ratio.detach()
        metrics = {
            "loss": float(loss.detach()),
            "kl_ref": mmean(kl_ref.detach()) if kl_ref is not None else 0.0,
            "clip_fraction": mmean((surr2 < surr1).to(lp.dtype)),
            "approx_kl": mmean(r - 1.0 - log_ratio.detach()),
            "ratio_mean": mmean(r),
            "ratio_max": float(torch.where(mask, r, zero).max()) if int(n_local) else 1.0,
            "num_tokens": float(n_local),
        }
    return loss, metrics
