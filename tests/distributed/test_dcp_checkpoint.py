"""Sharded (FSDP2) learner checkpoints with torch.distributed.checkpoint, in this process as a world of 1.

A gloo group of one rank runs the real FSDP2 + DCP code paths without spawning;
the 2-rank save / reshard-on-load case is in test_sharded_learner.py (slow).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from tepo_ray.config import AlgoConfig, TrainerConfig
from tepo_ray.weights.params import full_state_dict
from tepo_ray.trainer.checkpoint import list_checkpoints, load_latest
from tepo_ray.trainer.learner import Learner
from tepo_ray.trainer.scorer import EntropyScorer

from trainer_factories import make_group

ALGO = dict(mode="dense", alpha=0.5, lr=1e-3, entropy_chunk_size=5)


def _learner(model_path: str, run_dir: Path, *, sharded: bool) -> Learner:
    return Learner(model_path, algo_cfg=AlgoConfig(**ALGO),
                   trainer_cfg=TrainerConfig(micro_batch_size=4, keep_checkpoints=2),
                   run_dir=run_dir, seed=0, sharded=sharded)


def _optimizer_moments(learner: Learner) -> dict[str, torch.Tensor]:
    names = {id(p): n for n, p in learner.model.named_parameters()}
    out = {}
    for p, st in learner.optimizer.state.items():
        m = st["exp_avg"]
        out[names[id(p)]] = (m.full_tensor() if hasattr(m, "full_tensor") else m).clone()
    return out


def test_save_resume_reshard_and_export(world_of_one, tiny_model: str, tmp_path: Path) -> None:
    batch = make_group("g0", scores=[1.0, 0.0, 0.5, 0.2], seed=3)
    batch = EntropyScorer(tiny_model, algo_cfg=AlgoConfig()).score(batch)
    run = tmp_path / "run"
    learner = _learner(tiny_model, run, sharded=True)
    learner.train_step(copy.deepcopy(batch))
    path = Path(learner.save_checkpoint({"cursor": 7}))
    weights = full_state_dict(learner.model)
    moments = _optimizer_moments(learner)

    assert path.name == "step_1" and (path / "dcp" / ".metadata").is_file()
    assert (path / "model_config" / "config.json").is_file()
    assert [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp")] == []

    # A crash while rank 0 writes its files leaves step_1 as the latest complete checkpoint.
    learner.train_step(copy.deepcopy(batch))

    def crash(name: str) -> None:
        if name == "trainer_state.pt":
            raise RuntimeError("injected crash while writing the checkpoint")

    with pytest.raises(RuntimeError, match="injected"):
        learner.save_checkpoint({"cursor": 9}, on_file_written=crash)
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [1]
    assert load_latest(run / "checkpoints").path == path

    # Resume, sharded (same N): weights, optimizer moments, step/version and the driver's extra come back.
    resumed = _learner(tiny_model, run, sharded=True)
    assert resumed.restore() == {"cursor": 7}
    assert (resumed.step, resumed.version) == (1, 1)
    for name, t in full_state_dict(resumed.model).items():
        assert torch.equal(t, weights[name]), name
    for name, m in _optimizer_moments(resumed).items():
        assert torch.equal(m, moments[name]), name

    # Load into an unsharded single-process learner (a different layout): same weights and moments.
    plain = _learner(tiny_model, tmp_path / "plain", sharded=False)
    plain.restore(run / "checkpoints")
    for name, t in plain.model.state_dict().items():
        assert torch.equal(t, weights[name]), name
    for name, m in _optimizer_moments(plain).items():
        assert torch.equal(m, moments[name]), name

    # `tepo-ray export` writes a dir transformers loads, with the same log-probs.
    from typer.testing import CliRunner
    from transformers import AutoModelForCausalLM

    from tepo_ray.cli import app

    out = tmp_path / "exported"
    res = CliRunner().invoke(app, ["export", str(run), "--step", "1", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()

    hf = AutoModelForCausalLM.from_pretrained(str(out))
    ids = torch.tensor([batch[0].token_ids])
    with torch.no_grad():
        ref_logits = plain.model(input_ids=ids).logits
        got_logits = hf(input_ids=ids).logits
    torch.testing.assert_close(torch.log_softmax(got_logits, -1), torch.log_softmax(ref_logits, -1),
                               rtol=0, atol=1e-6)
    bad = CliRunner().invoke(app, ["export", str(run), "--step", "5", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "step_5" in bad.output and "[1]" in bad.output
    assert not (tmp_path / "x").exists()
