"""TEPO's equations as pure torch functions (no Ray, no I/O): DESIGN.md section 1.

Pipeline per batch::

    logits --token_entropy / token_logprobs_and_entropy--> H_t
    H_t, segment spans --segment_entropy--> mean H(r_k) --delta_entropy--> ΔH_k --entropy_decreased--> I_k
    answers --outcome_scores (f1_score / exact_match / math_equal)--> F1
    F1, I --sparse_rewards | dense_rewards--> r --grpo_advantages--> A --token_advantages--> A_t
    A_t, log-probs --policy_loss--> loss

``compute_advantages`` chains the reward -> advantage -> token steps for the
``grpo`` / ``sparse`` / ``dense`` modes. Reward functions, advantage estimators
and policy losses are looked up by name in registries (``get_reward_fn`` ...).
"""

from .advantages import compute_advantages, grpo_advantages, token_advantages
from .entropy import delta_entropy, entropy_decreased, segment_entropy, token_entropy, token_logprobs_and_entropy
from .loss import LossAgg, policy_loss
from .registry import (
    AdvEstimatorName,
    PolicyLossName,
    RewardFnName,
    get_adv_estimator,
    get_policy_loss,
    get_reward_fn,
    register_adv_estimator,
    register_policy_loss,
    register_reward_fn,
)
from .rewards import MalformedCallPolicy, RewardInputs, apply_malformed_policy, dense_rewards, sparse_rewards
from .scoring import TaskType, exact_match, f1_score, math_equal, outcome_scores

__all__ = [
    # equations
    "token_entropy",
    "token_logprobs_and_entropy",
    "segment_entropy",
    "delta_entropy",
    "entropy_decreased",
    "f1_score",
    "exact_match",
    "math_equal",
    "outcome_scores",
    "sparse_rewards",
    "dense_rewards",
    "grpo_advantages",
    "token_advantages",
    "policy_loss",
    "compute_advantages",
    # registries and their names
    "RewardInputs",
    "MalformedCallPolicy",
    "apply_malformed_policy",
    "RewardFnName",
    "AdvEstimatorName",
    "PolicyLossName",
    "LossAgg",
    "TaskType",
    "register_reward_fn",
    "get_reward_fn",
    "register_adv_estimator",
    "get_adv_estimator",
    "register_policy_loss",
    "get_policy_loss",
]
