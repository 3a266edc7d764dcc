"""`tepo-ray sweep`: bootstrap and arm expansion (fast); 2 arms x 1 seed x 2 steps end to end on the tiny model (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tepo_ray.config import load_config
from tepo_ray.sweep import paired_bootstrap, sweep_arms, tool_efficiency


def test_arms_expand_dense_per_alpha() -> None:
    cfg = load_config([], ["sweep.arms=[grpo,sparse,dense]", "sweep.alphas=[0.1,1.0]"])
    arms = sweep_arms(cfg.sweep)
    assert [a.name for a in arms] == ["grpo", "sparse", "dense-a0.1", "dense-a1"]
    assert arms[3].overrides() == ["algo.mode=dense", "algo.alpha=1.0"]
    with pytest.raises(Exception, match="sweep.arms"):
        load_config([], ["sweep.arms=[ppo]"])


def test_paired_bootstrap_ci_covers_the_difference_and_shrinks_with_n() -> None:
    a = [0.0, 1.0] * 20
    b = [1.0, 1.0] * 20  # +0.5 on average
    small = paired_bootstrap(a, b, seed=1)
    big = paired_bootstrap(a * 10, b * 10, seed=1)
    assert small["diff"] == pytest.approx(0.5)
    assert small["ci_low"] < 0.5 < small["ci_high"] and small["ci_low"] > 0
    assert (big["ci_high"] - big["ci_low"]) < (small["ci_high"] - small["ci_low"]) / 2
    same = paired_bootstrap(a, a)
    assert same["diff"] == 0 and same["ci_low"] == 0 and same["ci_high"] == 0
    with pytest.raises(ValueError, match="equal"):
        paired_bootstrap([1.0], [1.0, 0.0])
    assert tool_efficiency(0.8, 2.0) == pytest.approx(0.4) and tool_efficiency(0.8, 0.0) is None


@pytest.mark.slow
@pytest.mark.timeout(1800)  # 2 trainings + 3 evals; ~10 min on 2 shared, loaded cores
def test_sweep_two_arms_one_seed(tmp_path: Path, tiny_overrides: list[str]) -> None:
    from e2e_configs import CONFIG_FILES
    from tepo_ray.sweep import run_sweep

    cfg = load_config(CONFIG_FILES, tiny_overrides + ["sweep.arms=[grpo,sparse]", "sweep.seeds=[0]",
                                                      "trainer.steps=2", "trainer.checkpoint_interval=0",
                                                      "data.num_eval=8", "logging.wandb_group=sweep-test"])
    res = run_sweep(cfg, out_dir=tmp_path / "sweep")
    out = tmp_path / "sweep"
    assert set(res["arms"]) == {"grpo", "sparse"}
    for arm in ("grpo", "sparse"):
        run = out / "runs" / f"{arm}-s0"
        recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in recs] == [1, 2]
        run_cfg = (out / "configs" / f"{arm}-s0.yaml").read_text()
        assert f"mode: {arm}" in run_cfg and f"arm: {arm}" in run_cfg
        assert res["meta"]["sft_path"] in run_cfg  # every arm starts from the one SFT checkpoint
        wandb_runs = list((run / "wandb").glob("offline-run-*"))
        assert len(wandb_runs) == 1
        ev = json.loads((out / "eval" / f"{arm}-s0" / "eval.json").read_text())
        # collective weight sync writes no weight files: the final checkpoint is exported and evaluated
        assert ev["n"] == 8 and ev["weights"] is None and ev["model_path"] == str(run / "final_model")
        assert (run / "final_model" / "config.json").is_file()
    assert json.loads((out / "eval" / "sft" / "eval.json").read_text())["weights"] is None
    md = (out / "report.md").read_text()
    assert "| SFT |" in md and "| grpo | 1 |" in md and "| sparse | 1 |" in md
    assert (out / "curves_all.png").stat().st_size > 1000 and (out / "curves_grpo.png").exists()
