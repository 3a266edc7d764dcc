"""End to end with `topology.learner.replicas=2`: the driver trains through a 2-rank FSDP2 LearnerGroup,
checkpoints it (DCP) and `tepo-ray export` turns the checkpoint into a loadable HF model dir."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

CONFIGS = Path(__file__).resolve().parents[2] / "experiments" / "configs"


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("transport", ["collective", "file"])
def test_train_with_two_learner_ranks_then_export(tmp_path: Path, transport: str) -> None:
    ray = pytest.importorskip("ray")
    from typer.testing import CliRunner
    from transformers import AutoModelForCausalLM

    from tepo_ray.cli import app
    from tepo_ray.config import load_config
    from tepo_ray.prepare import prepare_data
    from tepo_ray.driver import train

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, object_store_memory=512 * 1024**2,
                 _system_config={"worker_niceness": 0})
    try:
        cfg = load_config([CONFIGS / "demo.yaml", CONFIGS / "tiny.yaml"], [
            f"model.cache_dir={os.environ.get('TEPO_TEST_CACHE') or tmp_path / 'cache'}",
            "logging.wandb_mode=disabled", f"logging.run_dir={tmp_path / 'run'}",
            "engine.name=hf", "trainer.steps=2", "trainer.checkpoint_interval=2", "async.max_staleness=0",
            "async.rollout_batch_groups=2", "topology.learner.replicas=2", "topology.learner.num_cpus=0.25",
            f"weights.transport={transport}",
        ])
        prepare_data(cfg, progress=False)
        summary = train(cfg)
    finally:
        if started:
            ray.shutdown()
    run_dir = Path(summary["run_dir"])
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [r["learner/step"] for r in recs] == [1.0, 2.0]
    assert all(r["learner/tokens_trained"] > 0 for r in recs)
    if transport == "file":
        assert (run_dir / "weights" / "v2.safetensors").is_file()
    else:  # weights went over the gloo group, never through a file
        assert not list((run_dir / "weights").glob("*.safetensors")) if (run_dir / "weights").exists() else True
    assert (run_dir / "checkpoints" / "step_2" / "dcp" / ".metadata").is_file()
    out = tmp_path / "exported"
    res = CliRunner().invoke(app, ["export", str(run_dir), "--out", str(out)])
    assert res.exit_code == 0, res.output
    from safetensors.torch import load_file

    hf = AutoModelForCausalLM.from_pretrained(str(out))
    if transport == "file":
        published = load_file(str(run_dir / "weights" / "v2.safetensors"))
        for name, t in hf.state_dict().items():
            assert (t == published[name]).all(), name
    else:  # the learner group published both versions over the gloo group (the demo's untrained
        # tiny model earns reward 0 in 2 steps, so the weights themselves need not move)
        assert [r["policy_version"] for r in recs] == [1, 2]
    assert (out / "tokenizer.json").is_file()
