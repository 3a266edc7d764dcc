"""Checkpoints: exact resume, crash mid-write, corrupt/stale `latest` pointer, retention, RNG."""

from __future__ import annotations

import copy
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from tepo_ray.config import AlgoConfig, TrainerConfig
from tepo_ray.trainer.checkpoint import (
    LATEST,
    capture_rng_state,
    list_checkpoints,
    load_latest,
    restore_rng_state,
    save_checkpoint,
)
from tepo_ray.trainer.learner import Learner
from tepo_ray.trainer.scorer import EntropyScorer

from trainer_factories import make_group


class FaultInjectingWriteError(RuntimeError):
    """Raised by the test hook to simulate a crash in the middle of a checkpoint write."""


def fault_after(n_entries: int):
    written = []

    def hook(name: str) -> None:
        written.append(name)
        if len(written) >= n_entries:
            raise FaultInjectingWriteError(f"injected crash after writing {written}")

    return hook


def _text_writers(payload: str):
    return {
        "a.txt": lambda p: p.write_text(payload),
        "sub": lambda p: (p.mkdir(), (p / "b.txt").write_text(payload * 2)),
    }


# --------------------------------------------------------------------------- checkpoint module
def test_save_and_load_latest_roundtrip_with_retention(tmp_path: Path) -> None:
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step=step, writers=_text_writers(f"s{step}"), keep=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 4]
    found = load_latest(tmp_path)
    assert found is not None and found.step == 4 and found.note is None
    assert (found.path / "a.txt").read_text() == "s4"
    assert (found.path / "sub" / "b.txt").read_text() == "s4s4"
    assert (tmp_path / LATEST).read_text().strip() == "step_4"


def test_crash_mid_write_keeps_previous_checkpoint(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, step=1, writers=_text_writers("old"), keep=3)
    with pytest.raises(FaultInjectingWriteError):
        save_checkpoint(tmp_path, step=2, writers=_text_writers("new"), keep=3, on_file_written=fault_after(1))
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")]
    assert leftovers  # the half-written directory is still there ...
    found = load_latest(tmp_path)
    assert found is not None and found.step == 1 and found.note is None  # ... and ignored
    assert (found.path / "a.txt").read_text() == "old"
    save_checkpoint(tmp_path, step=2, writers=_text_writers("new"), keep=3)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]  # cleaned by the next writer
    assert load_latest(tmp_path).step == 2


def test_corrupt_or_stale_pointer_falls_back_to_newest_complete(tmp_path: Path, caplog) -> None:
    for step in (1, 2):
        save_checkpoint(tmp_path, step=step, writers=_text_writers(f"s{step}"), keep=5)
    (tmp_path / LATEST).write_bytes(b"\xff\xfe garbage")
    found = load_latest(tmp_path)
    assert found.step == 2 and "latest" in found.note and "step_2" in found.note
    assert "falling back" in caplog.text

    (tmp_path / LATEST).write_text("step_1\n")  # stale: a newer complete checkpoint exists
    found = load_latest(tmp_path)
    assert found.step == 2 and "newer" in found.note

    (tmp_path / LATEST).write_text("step_7\n")  # names a checkpoint that does not exist
    assert load_latest(tmp_path).step == 2

    (tmp_path / LATEST).unlink()
    assert load_latest(tmp_path).step == 2


def test_incomplete_step_dirs_are_ignored(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, step=1, writers=_text_writers("one"), keep=5)
    save_checkpoint(tmp_path, step=2, writers=_text_writers("two"), keep=5)
    (tmp_path / "step_2" / "a.txt").write_text("truncated!!!!!!!")  # size no longer matches the manifest
    (tmp_path / "step_3").mkdir()  # no manifest at all
    (tmp_path / "step_3" / "a.txt").write_text("x")
    found = load_latest(tmp_path)
    assert found.step == 1 and "step_2" in found.note
    assert load_latest(tmp_path / "nothing-here") is None


def test_rng_state_roundtrip() -> None:
    state = capture_rng_state()
    first = (random.random(), np.random.rand(), torch.rand(3))
    restore_rng_state(state)
    second = (random.random(), np.random.rand(), torch.rand(3))
    assert first[0] == second[0] and first[1] == second[1] and torch.equal(first[2], second[2])


# --------------------------------------------------------------------------- learner resume
def _batches(model_path: str, n: int):
    scorer = EntropyScorer(model_path, algo_cfg=AlgoConfig())
    return [scorer.score(make_group(f"g{i}", scores=[1.0, 0.0, 0.5, 0.25], seed=i)) for i in range(n)]


def _make(model_path: str, run_dir: Path) -> Learner:
    algo = AlgoConfig(mode="dense", lr=1e-3, warmup_steps=2, kl_coef=0.05, weight_decay=0.01)
    trainer = TrainerConfig(micro_batch_size=3, keep_checkpoints=2)
    return Learner(model_path, algo_cfg=algo, trainer_cfg=trainer, run_dir=run_dir, seed=0)


def test_resume_equals_uninterrupted_training(tiny_model: str, tmp_path: Path) -> None:
    n, k = 4, 2
    batches = _batches(tiny_model, n)

    straight = _make(tiny_model, tmp_path / "straight")
    for b in batches:
        straight.train_step(copy.deepcopy(b))

    first = _make(tiny_model, tmp_path / "resumed")
    for b in batches[:k]:
        first.train_step(copy.deepcopy(b))
    first.save_checkpoint({"cursor": k, "buffer": ["u1", "u2"]})
    del first
    second = _make(tiny_model, tmp_path / "resumed")
    extra = second.restore()
    assert extra == {"cursor": k, "buffer": ["u1", "u2"]}
    assert (second.step, second.version) == (k, k)
    for b in batches[k:]:
        second.train_step(copy.deepcopy(b))

    assert (second.step, second.version) == (straight.step, straight.version)
    s_state, r_state = straight.model.state_dict(), second.model.state_dict()
    for name in s_state:
        assert torch.equal(s_state[name], r_state[name]), name
    s_opt, r_opt = straight.optimizer.state_dict(), second.optimizer.state_dict()
    assert s_opt["param_groups"] == r_opt["param_groups"]
    for pid, st in s_opt["state"].items():
        for key, val in st.items():
            assert torch.equal(val, r_opt["state"][pid][key]), (pid, key)
    assert straight.scheduler.state_dict() == second.scheduler.state_dict()
    # The resumed run's published weights are the same file content as the straight run's.
    assert Path(second.latest_weights()[0]).name == Path(straight.latest_weights()[0]).name == f"v{n}.safetensors"


def test_learner_crash_mid_checkpoint_restores_previous(tiny_model: str, tmp_path: Path) -> None:
    batches = _batches(tiny_model, 2)
    learner = _make(tiny_model, tmp_path)
    learner.train_step(copy.deepcopy(batches[0]))
    learner.save_checkpoint({"cursor": 1})
    weights_at_1 = {k: v.clone() for k, v in learner.model.state_dict().items()}
    learner.train_step(copy.deepcopy(batches[1]))
    with pytest.raises(FaultInjectingWriteError):
        learner.save_checkpoint({"cursor": 2}, on_file_written=fault_after(2))

    again = _make(tiny_model, tmp_path)
    assert again.restore() == {"cursor": 1}
    assert again.step == 1 and again.last_restore_note is None
    for name, v in again.model.state_dict().items():
        assert torch.equal(v, weights_at_1[name]), name


def test_restore_without_checkpoint_raises(tiny_model: str, tmp_path: Path) -> None:
    learner = _make(tiny_model, tmp_path)
    assert not learner.has_checkpoint()
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        learner.restore()
