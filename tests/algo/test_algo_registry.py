"""Registries (variation without flags) and the no-Ray rule for tepo_ray.algo."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tepo_ray.algo as algo
from tepo_ray.algo import (
    AdvEstimatorName,
    PolicyLossName,
    RewardFnName,
    RewardInputs,
    compute_advantages,
    get_adv_estimator,
    get_policy_loss,
    get_reward_fn,
    register_reward_fn,
)
from tepo_ray.algo.registry import REWARD_FNS

ALGO_DIR = Path(algo.__file__).parent


def test_builtin_names_resolve():
    assert {n.value for n in RewardFnName} == {"grpo", "sparse", "dense"}
    for name in RewardFnName:
        assert callable(get_reward_fn(name)) and get_reward_fn(name.value) is get_reward_fn(name)
    assert get_adv_estimator(AdvEstimatorName.GRPO) is algo.grpo_advantages
    assert get_policy_loss("clipped") is algo.policy_loss
    assert get_policy_loss(PolicyLossName.CLIPPED) is algo.policy_loss


@pytest.mark.parametrize(
    "getter, kind, valid",
    [
        (get_reward_fn, "reward function", "['dense', 'grpo', 'sparse']"),
        (get_adv_estimator, "advantage estimator", "['grpo']"),
        (get_policy_loss, "policy loss", "['clipped']"),
    ],
)
def test_unknown_name_lists_valid_ones(getter, kind, valid):
    with pytest.raises(ValueError, match=re.escape(f"unknown {kind} 'nope'; valid names: {valid}")):
        getter("nope")


def test_registered_reward_fn_is_used_by_compute_advantages():
    @register_reward_fn("calls_only")
    def calls_only(inputs: RewardInputs) -> torch.Tensor:  # reward = number of calls
        return inputs.num_calls.float()

    try:
        tok, rewards, _ = compute_advantages(
            "calls_only", scores=torch.zeros(2), group_index=torch.tensor([0, 0]), loss_mask=torch.ones(2, 3),
            num_calls=torch.tensor([0, 2]),
        )
        assert rewards.tolist() == [0.0, 2.0]
        # r = (0, 2): mean 1, unbiased std sqrt(2) -> A = ±1/sqrt(2)
        assert tok[0].tolist() == pytest.approx([-2 ** -0.5] * 3, rel=1e-5)
        assert tok[1].tolist() == pytest.approx([2 ** -0.5] * 3, rel=1e-5)
        with pytest.raises(ValueError, match="already registered"):
            register_reward_fn("calls_only")(lambda inputs: inputs.scores)
    finally:
        REWARD_FNS._fns.pop("calls_only", None)


def test_algo_never_imports_ray():
    pattern = re.compile(r"^\s*(import ray\b|from ray\b)", re.MULTILINE)
    offenders = [p.name for p in ALGO_DIR.glob("*.py") if pattern.search(p.read_text(encoding="utf-8"))]
    assert offenders == [], f"tepo_ray.algo modules import ray: {offenders}"
    code = (
        "import sys, tepo_ray.algo as a\n"
        "a.math_equal('1/2', '0.5'); a.f1_score('x', 'x')\n"
        "bad = sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.'))\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
