"""Named registries: reward functions, advantage estimators, policy losses.

Variation without flags (STYLE.md): a new reward mode, estimator or loss is a
function registered under a name, e.g.::

    @register_reward_fn("my_reward")
    def my_reward(inputs: RewardInputs) -> Tensor: ...

and selected by config (``algo.mode``, ``algo.policy_loss``). Built-in names are
the str Enums below; an unknown name raises ``ValueError`` listing the valid ones.
"""

from __future__ import annotations

import enum
from typing import Callable, Generic, TypeVar

__all__ = [
    "RewardFnName",
    "AdvEstimatorName",
    "PolicyLossName",
    "Registry",
    "register_reward_fn",
    "get_reward_fn",
    "register_adv_estimator",
    "get_adv_estimator",
    "register_policy_loss",
    "get_policy_loss",
]

F = TypeVar("F", bound=Callable)


class RewardFnName(str, enum.Enum):
    GRPO = "grpo"  # r_i = F1
    SPARSE = "sparse"  # r_i = F1 * m_i / n_i
    DENSE = "dense"  # r_tool_{i,k} = F1 * (1 + alpha * I_{i,k})


class AdvEstimatorName(str, enum.Enum):
    GRPO = "grpo"  # group mean/std normalisation


class PolicyLossName(str, enum.Enum):
    CLIPPED = "clipped"  # token-level clipped surrogate (+ optional k3 KL)


class Registry(Generic[F]):
    """A name -> function map with a readable error for unknown names."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._fns: dict[str, F] = {}

    def register(self, name: str | enum.Enum, *, overwrite: bool = False) -> Callable[[F], F]:
        key = name.value if isinstance(name, enum.Enum) else str(name)

        def deco(fn: F) -> F:
            if key in self._fns and not overwrite and self._fns[key] is not fn:
                raise ValueError(f"{self.kind} {key!r} is already registered; pass overwrite=True to replace it")
            self._fns[key] = fn
            return fn

        return deco

    def get(self, name: str | enum.Enum) -> F:
        key = name.value if isinstance(name, enum.Enum) else str(name)
        try:
            return self._fns[key]
        except KeyError:
            raise ValueError(f"unknown {self.kind} {key!r}; valid names: {sorted(self._fns)}") from None

    def names(self) -> list[str]:
        return sorted(self._fns)


REWARD_FNS: Registry = Registry("reward function")
ADV_ESTIMATORS: Registry = Registry("advantage estimator")
POLICY_LOSSES: Registry = Registry("policy loss")


def register_reward_fn(name: str | enum.Enum, *, overwrite: bool = False) -> Callable[[F], F]:
    """Decorator: register ``fn(inputs: RewardInputs) -> Tensor`` under ``name``."""
    return REWARD_FNS.register(name, overwrite=overwrite)


def get_reward_fn(name: str | enum.Enum) -> Callable:
    return REWARD_FNS.get(name)


def register_adv_estimator(name: str | enum.Enum, *, overwrite: bool = False) -> Callable[[F], F]:
    """Decorator: register ``fn(rewards, group_index, *, eps, std_normalize, mask) -> Tensor``."""
    return ADV_ESTIMATORS.register(name, overwrite=overwrite)


def get_adv_estimator(name: str | enum.Enum) -> Callable:
    return ADV_ESTIMATORS.get(name)


def register_policy_loss(name: str | enum.Enum, *, overwrite: bool = False) -> Callable[[F], F]:
    """Decorator: register a loss with :func:`tepo_ray.algo.policy_loss`'s keyword signature."""
    return POLICY_LOSSES.register(name, overwrite=overwrite)


def get_policy_loss(name: str | enum.Enum) -> Callable:
    return POLICY_LOSSES.get(name)
