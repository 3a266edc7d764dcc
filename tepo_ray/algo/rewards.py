"""Rewards of the three arms (DESIGN.md section 1).

* GRPO:        ``r_i = F1_i``
* TEPO-sparse: ``r_i = F1_i · m_i / n_i`` (m = entropy-decreasing calls, n = calls);
  ``n_i = 0`` -> ``F1_i`` or a fixed number (``algo.sparse.no_tool_value``).
* TEPO-dense:  ``r^tool_{i,k} = F1_i · (1 + α · I_{i,k})`` for every call k.

Malformed calls (``MalformedCallPolicy``, ``algo.malformed_calls``; docs/algorithm.md):
``exclude`` drops them from m, n and the per-call rewards (as if never made);
``penalize`` counts them in n, never in m, and gives them the dense per-call
reward 0 (the lowest any call can get, since F1 ∈ [0, 1] and α ≥ 0). Neither
ever earns the α bonus.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch
from torch import Tensor

from .registry import RewardFnName, register_reward_fn

__all__ = ["RewardInputs", "MalformedCallPolicy", "apply_malformed_policy", "sparse_rewards", "dense_rewards",
           "grpo_reward", "sparse_reward", "dense_reward"]


class MalformedCallPolicy(str, enum.Enum):
    EXCLUDE = "exclude"  # not in m/n, no per-call reward: as if the call was never made
    PENALIZE = "penalize"  # in n, never in m; dense per-call reward 0


def apply_malformed_policy(
    policy: str | MalformedCallPolicy, *, call_mask: Tensor, decreased: Tensor, malformed: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """``(call_mask, decreased, penalized)`` after applying `policy` to the malformed calls.

    Args:
        call_mask / decreased / malformed: ``[B, K]`` bool (malformed outside call_mask is ignored).
    Returns:
        ``call_mask`` ``[B, K]`` (malformed calls removed under ``exclude``), ``decreased`` ``[B, K]``
        (never True on a malformed call), ``penalized`` ``[B, K]`` (malformed calls under ``penalize``).
    """
    try:
        policy = MalformedCallPolicy(policy.value if isinstance(policy, enum.Enum) else policy)
    except ValueError:
        raise ValueError(
            f"malformed call policy {policy!r}: expected one of {[p.value for p in MalformedCallPolicy]}"
        ) from None
    if not (call_mask.shape == decreased.shape == malformed.shape) or call_mask.dim() != 2:
        raise ValueError(
            f"call_mask {tuple(call_mask.shape)}, decreased {tuple(decreased.shape)} and malformed "
            f"{tuple(malformed.shape)} must all have shape [B, K]"
        )
    call_mask = call_mask.bool()
    bad = malformed.bool().to(call_mask.device) & call_mask
    decreased = decreased.bool().to(call_mask.device) & ~bad
    if policy is MalformedCallPolicy.EXCLUDE:
        return call_mask & ~bad, decreased, torch.zeros_like(bad)
    return call_mask, decreased, bad


def _as_float_tensor(name: str, x: Tensor) -> Tensor:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x.float() if not x.is_floating_point() else x


def sparse_rewards(
    scores: Tensor,
    *,
    num_decreasing: Tensor,
    num_calls: Tensor,
    no_tool_value: str | float = "score",
) -> Tensor:
    """TEPO-sparse trajectory reward ``r_i = F1_i · m_i / n_i``.

    Args:
        scores: ``[B]`` outcome scores F1.
        num_decreasing: ``[B]`` m, calls with ΔH < 0 (undefined ΔH not counted).
        num_calls: ``[B]`` n.
        no_tool_value: reward when n = 0: ``"score"`` (= F1) or a number.
    Returns:
        ``[B]`` float rewards (dtype of ``scores``, float32 if integer).
    """
    scores = _as_float_tensor("scores", scores)
    if scores.dim() != 1 or num_decreasing.shape != scores.shape or num_calls.shape != scores.shape:
        raise ValueError(
            f"scores {tuple(scores.shape)}, num_decreasing {tuple(num_decreasing.shape)} and num_calls "
            f"{tuple(num_calls.shape)} must all have shape [B]"
        )
    m = num_decreasing.to(scores.device, torch.float64)
    n = num_calls.to(scores.device, torch.float64)
    if bool((n < 0).any()) or bool((m < 0).any()) or bool((m > n).any()):
        raise ValueError(
            f"need 0 <= num_decreasing <= num_calls; got num_decreasing={num_decreasing.tolist()}, "
            f"num_calls={num_calls.tolist()}"
        )
    if no_tool_value == "score":
        no_tool = scores
    else:
        try:
            value = float(no_tool_value)
        except (TypeError, ValueError):
            raise ValueError(f"no_tool_value={no_tool_value!r}: expected 'score' or a number") from None
        no_tool = torch.full_like(scores, value)
    frac = torch.where(n > 0, m / n.clamp_min(1), torch.zeros_like(n)).to(scores.dtype)
    return torch.where(n > 0, scores * frac, no_tool)


def dense_rewards(scores: Tensor, *, decreased: Tensor, call_mask: Tensor, alpha: float,
                  penalized: Tensor | None = None) -> Tensor:
    """TEPO-dense per-call reward ``r^tool_{i,k} = F1_i · (1 + α · I_{i,k})``.

    Args:
        scores: ``[B]`` outcome scores F1.
        decreased: ``[B, K]`` bool I (ΔH_k < 0); ignored where ``call_mask`` is False.
        call_mask: ``[B, K]`` bool, True for calls that exist (padding False).
        alpha: entropy bonus α >= 0.
        penalized: ``[B, K]`` bool or None; True -> reward 0 (a malformed call under ``penalize``).
    Returns:
        ``[B, K]`` rewards, 0 where ``call_mask`` is False or ``penalized`` is True.
    """
    scores = _as_float_tensor("scores", scores)
    if (scores.dim() != 1 or decreased.dim() != 2 or decreased.shape != call_mask.shape
            or decreased.shape[0] != scores.shape[0]):
        raise ValueError(
            f"expected scores [B], decreased [B, K], call_mask [B, K]; got {tuple(scores.shape)}, "
            f"{tuple(decreased.shape)}, {tuple(call_mask.shape)}"
        )
    if alpha < 0:
        raise ValueError(f"alpha={alpha}: expected >= 0")
    bonus = 1.0 + alpha * decreased.to(scores.device, torch.bool).to(scores.dtype)  # [B, K]
    r = scores.unsqueeze(-1) * bonus
    keep = call_mask.to(scores.device, torch.bool)
    if penalized is not None:
        if penalized.shape != call_mask.shape:
            raise ValueError(f"penalized {tuple(penalized.shape)} must have the shape of call_mask {tuple(call_mask.shape)}")
        keep = keep & ~penalized.to(scores.device, torch.bool)
    return torch.where(keep, r, torch.zeros_like(r))


# ----------------------------------------------------------------------------- registry
@dataclass
class RewardInputs:
    """Everything a registered reward function may use (per batch of B trajectories)."""

    scores: Tensor  # [B] outcome scores F1
    num_calls: Tensor | None = None  # [B] n
    num_decreasing: Tensor | None = None  # [B] m; derived from decreased & call_mask when None
    decreased: Tensor | None = None  # [B, K] bool I
    call_mask: Tensor | None = None  # [B, K] bool
    alpha: float = 0.0
    no_tool_value: str | float = "score"
    penalized: Tensor | None = None  # [B, K] bool: malformed calls under the "penalize" policy (dense reward 0)

    def require(self, *names: str, mode: str) -> None:
        missing = [n for n in names if getattr(self, n) is None]
        if missing:
            raise ValueError(f"reward mode {mode!r} needs {missing}; they were None")


@register_reward_fn(RewardFnName.GRPO)
def grpo_reward(inputs: RewardInputs) -> Tensor:
    """``r_i = F1_i`` ([B])."""
    return _as_float_tensor("scores", inputs.scores).clone()


@register_reward_fn(RewardFnName.SPARSE)
def sparse_reward(inputs: RewardInputs) -> Tensor:
    """``r_i = F1_i · m_i / n_i`` ([B])."""
    m = inputs.num_decreasing
    n = inputs.num_calls
    if m is None or n is None:
        inputs.require("decreased", "call_mask", mode="sparse")
        mask = inputs.call_mask.bool()
        if m is None:
            m = (inputs.decreased.bool() & mask).sum(-1)
        if n is None:
            n = mask.sum(-1)
    return sparse_rewards(inputs.scores, num_decreasing=m, num_calls=n, no_tool_value=inputs.no_tool_value)


@register_reward_fn(RewardFnName.DENSE)
def dense_reward(inputs: RewardInputs) -> Tensor:
    """``r^tool_{i,k} = F1_i · (1 + α · I_{i,k})`` ([B, K])."""
    inputs.require("decreased", "call_mask", mode="dense")
    return dense_rewards(inputs.scores, decreased=inputs.decreased, call_mask=inputs.call_mask, alpha=inputs.alpha,
                         penalized=inputs.penalized)
