"""Advantages: GRPO group normalisation and their placement on tokens.

``A_i = (r_i - mean_{g(i)} r) / (std_{g(i)} r + eps)`` over the members of each
group g (the G samples of one prompt). ``std`` is the *unbiased* (Bessel-corrected,
``/(n-1)``) standard deviation, as ``torch.std`` computes it and as verl's and
TRL's GRPO use. A group with a single (unmasked) member has no spread: its
advantage is 0. A group whose rewards are all equal also gets 0.

TEPO-dense normalises the per-call tool rewards of a whole group together
(flatten ``[B, K]`` with ``call_mask``, group index repeated per call) and puts
``A^tool_{i,k}`` on every token of segment ``r_{i,k}``; the final segment gets the
group-normalised outcome advantage (DESIGN.md section 1).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .registry import AdvEstimatorName, RewardFnName, get_adv_estimator, get_reward_fn, register_adv_estimator
from .rewards import MalformedCallPolicy, RewardInputs, apply_malformed_policy

__all__ = ["grpo_advantages", "token_advantages", "compute_advantages"]


@register_adv_estimator(AdvEstimatorName.GRPO)
def grpo_advantages(
    rewards: Tensor,
    group_index: Tensor,
    *,
    eps: float = 1e-6,
    std_normalize: bool = True,
    mask: Tensor | None = None,
) -> Tensor:
    """GRPO group-normalised advantages, vectorised with scatter ops.

    Args:
        rewards: ``[N]`` rewards.
        group_index: ``[N]`` long group ids (any integers; need not be contiguous).
        eps: added to the group std.
        std_normalize: False -> ``r - mean`` only (Dr. GRPO style).
        mask: ``[N]`` bool; only True entries take part, the others get 0 (their
            reward values, even NaN, are ignored).
    Returns:
        ``[N]`` advantages, dtype of ``rewards`` (float32 for integer rewards).
    """
    if rewards.dim() != 1 or group_index.shape != rewards.shape:
        raise ValueError(
            f"rewards {tuple(rewards.shape)} and group_index {tuple(group_index.shape)} must both have shape [N]"
        )
    if group_index.is_floating_point():
        raise ValueError(f"group_index must be an integer tensor, got dtype {group_index.dtype}")
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    if mask is None:
        mask = torch.ones_like(rewards, dtype=torch.bool)
    elif mask.shape != rewards.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} must equal rewards shape {tuple(rewards.shape)}")
    mask = mask.to(rewards.device, torch.bool)
    if rewards.numel() == 0:
        return torch.zeros_like(rewards, dtype=out_dtype)

    r = torch.where(mask, rewards.double(), torch.zeros((), dtype=torch.float64, device=rewards.device))  # [N]
    _, inv = torch.unique(group_index.to(rewards.device), return_inverse=True)  # [N] in [0, G)
    G = int(inv.max()) + 1
    w = mask.double()
    count = torch.zeros(G, dtype=torch.float64, device=r.device).index_add_(0, inv, w)  # [G]
    total = torch.zeros_like(count).index_add_(0, inv, r)  # [G]
    mean = total / count.clamp_min(1)  # [G]
    centered = torch.where(mask, r - mean[inv], torch.zeros_like(r))  # [N]
    adv = centered
    if std_normalize:
        sq = torch.zeros_like(count).index_add_(0, inv, centered * centered)  # [G]
        std = (sq / (count - 1).clamp_min(1)).sqrt()  # [G] unbiased
        adv = centered / (std[inv] + eps)
    # Equal rewards -> exactly 0: the float mean of equal values can differ from them by an ulp, which
    # divided by a ~0 std would give advantages of ~1e-7 instead of 0.
    inf = torch.tensor(float("inf"), dtype=torch.float64, device=r.device)
    gmax = torch.full_like(count, -float("inf")).scatter_reduce(0, inv, torch.where(mask, r, -inf), "amax")  # [G]
    gmin = torch.full_like(count, float("inf")).scatter_reduce(0, inv, torch.where(mask, r, inf), "amin")  # [G]
    valid = mask & (count[inv] > 1) & (gmax[inv] > gmin[inv])
    return torch.where(valid, adv, torch.zeros_like(adv)).to(out_dtype)


def token_advantages(
    *,
    loss_mask: Tensor,
    outcome_advantages: Tensor,
    tool_advantages: Tensor | None = None,
    call_spans: Tensor | None = None,
    call_mask: Tensor | None = None,
) -> Tensor:
    """Spread advantages over tokens.

    GRPO / sparse (``tool_advantages`` None): every trainable token of trajectory b
    gets ``outcome_advantages[b]``. Dense: a token inside call span k of trajectory b
    (the reasoning segment ending with call k, tags included) gets
    ``tool_advantages[b, k]``; every other trainable token gets the outcome advantage.
    Tokens with ``loss_mask == 0`` get 0.

    Args:
        loss_mask: ``[B, T]`` 0/1 (or bool).
        outcome_advantages: ``[B]``.
        tool_advantages: ``[B, K]`` or None.
        call_spans: ``[B, K, 2]`` long ``(start, end)``, end exclusive (needed with tool_advantages).
        call_mask: ``[B, K]`` bool, True for real calls (default: all True).
    Returns:
        ``[B, T]`` advantages (dtype of ``outcome_advantages``).
    """
    if loss_mask.dim() != 2 or outcome_advantages.shape != loss_mask.shape[:1]:
        raise ValueError(
            f"expected loss_mask [B, T] and outcome_advantages [B]; got {tuple(loss_mask.shape)} and "
            f"{tuple(outcome_advantages.shape)}"
        )
    B, T = loss_mask.shape
    trainable = loss_mask.to(outcome_advantages.device) > 0  # [B, T]
    zero = torch.zeros((), dtype=outcome_advantages.dtype, device=outcome_advantages.device)
    adv = outcome_advantages.unsqueeze(-1).expand(B, T)  # [B, T]
    if tool_advantages is not None:
        if call_spans is None:
            raise ValueError("tool_advantages given without call_spans: expected call_spans [B, K, 2]")
        K = tool_advantages.shape[-1] if tool_advantages.dim() == 2 else -1
        if tool_advantages.shape != (B, K) or call_spans.shape != (B, K, 2):
            raise ValueError(
                f"expected tool_advantages [B={B}, K] and call_spans [B, K, 2]; got {tuple(tool_advantages.shape)} "
                f"and {tuple(call_spans.shape)}"
            )
        if call_mask is None:
            call_mask = torch.ones(B, K, dtype=torch.bool, device=adv.device)
        elif call_mask.shape != (B, K):
            raise ValueError(f"call_mask shape {tuple(call_mask.shape)} must be [B={B}, K={K}]")
        spans = call_spans.to(adv.device, torch.long)
        pos = torch.arange(T, device=adv.device).view(1, 1, T)  # [1, 1, T]
        real = call_mask.to(adv.device, torch.bool).unsqueeze(-1)  # [B, K, 1]
        inside = (pos >= spans[..., :1]) & (pos < spans[..., 1:]) & real  # [B, K, T]
        hits = inside.sum(1)  # [B, T]
        if bool((hits > 1).any()):
            b, t = (hits > 1).nonzero()[0].tolist()
            raise ValueError(f"call spans overlap: token {t} of trajectory {b} lies in more than one call span")
        tool_val = torch.where(inside, tool_advantages.to(adv.dtype).unsqueeze(-1), zero).sum(1)  # [B, T]
        adv = torch.where(hits > 0, tool_val, adv)
    return torch.where(trainable, adv, zero)


def _summary(x: Tensor, mask: Tensor | None = None) -> tuple[float, float]:
    vals = x[mask] if mask is not None else x.reshape(-1)
    if vals.numel() == 0:
        return 0.0, 0.0
    vals = vals.double()
    return float(vals.mean()), float(vals.std(unbiased=False))


def compute_advantages(
    mode: str | RewardFnName,
    *,
    scores: Tensor,
    group_index: Tensor,
    loss_mask: Tensor,
    num_calls: Tensor | None = None,
    decreased: Tensor | None = None,
    call_mask: Tensor | None = None,
    call_spans: Tensor | None = None,
    malformed: Tensor | None = None,
    malformed_calls: str | MalformedCallPolicy = MalformedCallPolicy.EXCLUDE,
    alpha: float = 0.0,
    no_tool_value: str | float = "score",
    eps: float = 1e-6,
    std_normalize: bool = True,
    adv_estimator: str | AdvEstimatorName = AdvEstimatorName.GRPO,
) -> tuple[Tensor, Tensor, dict[str, float]]:
    """Rewards -> advantages -> token advantages for one batch (what the learner calls).

    * ``grpo``:   ``r_i = F1_i``; ``A_i`` group-normalised; on all trainable tokens.
    * ``sparse``: ``r_i = F1_i · m_i / n_i``; ``A_i`` group-normalised; on all trainable tokens.
    * ``dense``:  ``r^tool_{i,k} = F1_i (1 + α I_{i,k})`` normalised over all calls of
      the group -> tokens of segment k; outcome advantage (group-normalised F1) on
      every other trainable token (the final segment).

    Args:
        mode: a registered reward function name (:class:`RewardFnName`).
        scores: ``[B]`` F1; group_index: ``[B]`` long; loss_mask: ``[B, T]``.
        num_calls: ``[B]`` n (default: ``call_mask.sum(-1)``; must agree with it).
        decreased / call_mask: ``[B, K]`` bool; call_spans: ``[B, K, 2]`` (dense).
        malformed: ``[B, K]`` bool, True for malformed calls (``ToolCall.malformed``), handled by
            ``malformed_calls`` (``exclude`` | ``penalize``, see ``apply_malformed_policy``); ``num_calls``
            and ``call_mask`` include them on input. An excluded call's tokens get the outcome advantage.
    Returns:
        ``(token_adv [B, T], rewards [B], metrics)``. ``rewards`` is the trajectory
        reward ``r_i`` (for dense: the outcome reward F1, its per-call rewards are
        summarised in metrics). Metric keys: ``reward_mean``, ``reward_std``,
        ``adv_mean``, ``adv_abs_mean`` (over trainable tokens), ``decreasing_fraction`` (pooled
        share of counted calls with I = 1, 0 without calls; the per-trajectory m/n that is logged
        as ``tepo/m_over_n`` is ``tepo_ray.metrics.call_stats``),
        ``num_calls_mean`` (counted calls), ``malformed_calls`` (how many in the batch), and for
        dense ``tool_reward_mean`` / ``tool_adv_abs_mean``.
    """
    mode_key = mode.value if isinstance(mode, RewardFnName) else str(mode)
    reward_fn = get_reward_fn(mode_key)
    estimator = get_adv_estimator(adv_estimator)
    B = scores.shape[0]
    if scores.dim() != 1 or group_index.shape != (B,) or loss_mask.dim() != 2 or loss_mask.shape[0] != B:
        raise ValueError(
            f"expected scores [B], group_index [B], loss_mask [B, T]; got {tuple(scores.shape)}, "
            f"{tuple(group_index.shape)}, {tuple(loss_mask.shape)}"
        )
    if call_mask is not None:
        call_mask = call_mask.bool()
        if num_calls is None:
            num_calls = call_mask.sum(-1)
        elif not torch.equal(num_calls.to(call_mask.device).long(), call_mask.sum(-1)):
            raise ValueError(
                f"num_calls {num_calls.tolist()} disagrees with call_mask.sum(-1) {call_mask.sum(-1).tolist()}"
            )
    penalized = None
    n_malformed = 0
    if malformed is not None:
        if call_mask is None or decreased is None:
            raise ValueError("malformed given without call_mask and decreased: expected all three as [B, K]")
        n_malformed = int((malformed.bool() & call_mask).sum())
        call_mask, decreased, penalized = apply_malformed_policy(
            malformed_calls, call_mask=call_mask, decreased=decreased, malformed=malformed)
        num_calls = call_mask.sum(-1)
    inputs = RewardInputs(
        scores=scores.float(),
        num_calls=num_calls,
        decreased=decreased,
        call_mask=call_mask,
        alpha=alpha,
        no_tool_value=no_tool_value,
        penalized=penalized,
    )
    rewards = reward_fn(inputs)
    metrics: dict[str, float] = {}
    if rewards.dim() == 1:  # trajectory-level reward (grpo, sparse)
        outcome_adv = estimator(rewards, group_index, eps=eps, std_normalize=std_normalize)  # [B]
        token_adv = token_advantages(loss_mask=loss_mask, outcome_advantages=outcome_adv)
        traj_rewards = rewards
    elif rewards.dim() == 2:  # per-call reward (dense)
        if call_spans is None or call_mask is None:
            raise ValueError(f"reward mode {mode_key!r} gives per-call rewards; it needs call_spans and call_mask")
        K = rewards.shape[1]
        flat_group = group_index.unsqueeze(-1).expand(B, K).reshape(-1)  # [B*K]
        tool_adv = estimator(
            rewards.reshape(-1), flat_group, eps=eps, std_normalize=std_normalize, mask=call_mask.reshape(-1)
        ).view(B, K)  # [B, K]
        traj_rewards = inputs.scores
        outcome_adv = estimator(traj_rewards, group_index, eps=eps, std_normalize=std_normalize)  # [B]
        token_adv = token_advantages(
            loss_mask=loss_mask,
            outcome_advantages=outcome_adv,
            tool_advantages=tool_adv,
            call_spans=call_spans,
            call_mask=call_mask,
        )
        metrics["tool_reward_mean"] = _summary(rewards, call_mask)[0]
        metrics["tool_adv_abs_mean"] = _summary(tool_adv.abs(), call_mask)[0]
    else:
        raise ValueError(f"reward function {mode_key!r} returned shape {tuple(rewards.shape)}; expected [B] or [B, K]")

    metrics["reward_mean"], metrics["reward_std"] = _summary(traj_rewards)
    trainable = loss_mask > 0
    metrics["adv_mean"] = _summary(token_adv, trainable)[0]
    metrics["adv_abs_mean"] = _summary(token_adv.abs(), trainable)[0]
    if call_mask is not None and decreased is not None:
        n_total = int(call_mask.sum())
        metrics["decreasing_fraction"] = float((decreased.bool() & call_mask).sum()) / n_total if n_total else 0.0
    metrics["malformed_calls"] = float(n_malformed)
    if num_calls is not None:
        metrics["num_calls_mean"] = float(num_calls.double().mean()) if B else 0.0
    return token_adv, traj_rewards, metrics
