"""Fault injection into short async training runs on a real local Ray with the tiny model.

Every run must finish, or stop with a clear error; every generated sample is accounted for in
metrics.jsonl: generated = trained + dropped-stale + failed + in flight (at each logged step).
The injectors are the test helpers of actors/faults.py. All are marked slow; the fast default
runs in this directory are the no-Ray ones (test_rollout_faults.py): each of these runs takes
1.5-3 minutes on a loaded 2-core machine (measured: 168 s and 110 s for the two learner kills).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tepo_ray.config import load_config
from tepo_ray.metrics import K, read_metrics

CONFIG_FILES = [Path(__file__).resolve().parents[2] / "experiments" / "configs" / name for name in ("demo.yaml", "tiny.yaml")]

pytestmark = pytest.mark.ray

BASE = ["engine.name=hf", "async.max_staleness=1", "trainer.checkpoint_interval=0"]


def _cfg(overrides, tmp_path, *extra):
    return load_config(CONFIG_FILES, [*overrides, f"logging.run_dir={tmp_path / 'run'}", *BASE, *extra])


def _train(cfg, **kw):
    from tepo_ray.driver import train

    return train(cfg, **kw)


def check_accounting(recs: list[dict]) -> None:
    """generated = trained + dropped-stale + failed + in flight, at every record; trained is exact."""
    assert recs, "no metrics were logged"
    batch_samples = None
    for r in recs:
        lhs = r[K.SAMPLES_GENERATED]
        rhs = r[K.SAMPLES_TRAINED] + r[K.SAMPLES_DROPPED_STALE] + r[K.SAMPLES_FAILED] + r[K.SAMPLES_IN_FLIGHT]
        assert lhs == rhs, (r[K.STEP], lhs, rhs)
        assert r[K.SAMPLES_TRAINED] > 0
        batch_samples = batch_samples or r[K.SAMPLES_TRAINED] // r[K.STEP]
        assert r[K.SAMPLES_TRAINED] == r[K.STEP] * batch_samples  # one full batch per step, none twice


def _steps(summary) -> list[dict]:
    return read_metrics(Path(summary["run_dir"]) / "metrics.jsonl")


@pytest.mark.slow
def test_learner_killed_mid_step_comes_back_from_its_checkpoint(tiny_overrides, tmp_path):
    from actors.faults import KillingLearnerWorker

    marker = tmp_path / "learner-killed"
    cfg = _cfg(tiny_overrides, tmp_path, "trainer.steps=4", "trainer.checkpoint_interval=2")
    summary = _train(cfg, learner_cls=KillingLearnerWorker,
                     learner_kwargs={"kill_marker": str(marker), "kill_at_step": 3, "when": "mid"})
    assert marker.exists(), "the injected kill did not fire"
    recs = _steps(summary)
    assert [r[K.STEP] for r in recs] == [1, 2, 3, 4]
    assert [r[K.VERSION] for r in recs] == [1, 2, 3, 4]  # never went back to version 0
    assert recs[-1][K.LEARNER_RESTARTS] == 1
    check_accounting(recs)


@pytest.mark.slow
def test_learner_killed_without_a_checkpoint_stops_with_a_clear_error(tiny_overrides, tmp_path):
    from actors.faults import KillingLearnerWorker

    cfg = _cfg(tiny_overrides, tmp_path, "trainer.steps=3")
    with pytest.raises(RuntimeError, match=r"no complete checkpoint.*trainer\.checkpoint_interval"):
        _train(cfg, learner_cls=KillingLearnerWorker,
               learner_kwargs={"kill_marker": str(tmp_path / "m"), "kill_at_step": 2, "when": "between"})


@pytest.mark.slow
@pytest.mark.parametrize("kill_on", ["batch", "weight_load"])
def test_generator_killed_mid_batch_or_mid_weight_load(tiny_overrides, tmp_path, kill_on):
    from actors.faults import KillingGenerationWorker

    marker = tmp_path / "gen-killed"
    summary = _train(_cfg(tiny_overrides, tmp_path, "trainer.steps=3"), generator_cls=KillingGenerationWorker,
                     generator_kwargs={"kill_marker": str(marker), "kill_on": kill_on})
    assert marker.exists()
    recs = _steps(summary)
    assert [r[K.STEP] for r in recs] == [1, 2, 3] and recs[-1][K.RESTARTS] >= 1
    check_accounting(recs)


@pytest.mark.slow
def test_scorer_killed(tiny_overrides, tmp_path):
    from actors.faults import FaultInjectingScorerWorker

    marker = tmp_path / "scorer-killed"
    summary = _train(_cfg(tiny_overrides, tmp_path, "trainer.steps=3"), scorer_cls=FaultInjectingScorerWorker,
                     scorer_kwargs={"crash_marker": str(marker)})
    assert marker.exists()
    recs = _steps(summary)
    assert [r[K.STEP] for r in recs] == [1, 2, 3]
    check_accounting(recs)


@pytest.mark.slow
def test_learner_killed_between_steps(tiny_overrides, tmp_path):
    from actors.faults import KillingLearnerWorker

    marker = tmp_path / "learner-killed"
    cfg = _cfg(tiny_overrides, tmp_path, "trainer.steps=4", "trainer.checkpoint_interval=1")
    recs = _steps(_train(cfg, learner_cls=KillingLearnerWorker,
                         learner_kwargs={"kill_marker": str(marker), "kill_at_step": 3, "when": "between"}))
    assert marker.exists() and [r[K.VERSION] for r in recs] == [1, 2, 3, 4]
    check_accounting(recs)


@pytest.mark.slow
def test_engine_exceptions_and_failed_weight_loads_are_never_trained(tiny_overrides, tmp_path):
    from actors.faults import FailingWeightLoadGenerationWorker

    summary = _train(_cfg(tiny_overrides, tmp_path, "trainer.steps=3"),
                     generator_cls=FailingWeightLoadGenerationWorker, generator_kwargs={"fail_loads": 2})
    recs = _steps(summary)
    assert [r[K.STEP] for r in recs] == [1, 2, 3]
    assert recs[-1][K.WEIGHT_LOAD_FAILURES] >= 1
    assert all(r[K.FINISH.format(reason="error")] == 0 for r in recs)
    check_accounting(recs)


@pytest.mark.slow
def test_repeated_nonfinite_loss_stops_the_run(tiny_overrides, tmp_path):
    from actors.faults import NonFiniteLearnerWorker

    cfg = _cfg(tiny_overrides, tmp_path, "trainer.steps=5")
    with pytest.raises(RuntimeError, match="non-finite loss or gradient"):
        _train(cfg, learner_cls=NonFiniteLearnerWorker, learner_kwargs={"nan_steps": (1, 2, 3)})
    recs = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["learner/update_skipped"] for r in recs] == [1.0, 1.0, 1.0]


@pytest.mark.slow
def test_disk_full_during_a_checkpoint_keeps_the_previous_one(tiny_overrides, tmp_path):
    from actors.faults import DiskFullCheckpointLearnerWorker
    from tepo_ray.trainer.checkpoint import load_latest

    cfg = _cfg(tiny_overrides, tmp_path, "trainer.steps=3", "trainer.checkpoint_interval=1")
    recs = _steps(_train(cfg, learner_cls=DiskFullCheckpointLearnerWorker, learner_kwargs={"full_at": 2}))
    assert [r[K.STEP] for r in recs] == [1, 2, 3]
    assert recs[-1][K.CHECKPOINT_FAILURES] == 1
    latest = load_latest(tmp_path / "run" / "checkpoints")
    assert latest is not None and latest.step == 3


@pytest.mark.slow
def test_stuck_stats_call_does_not_stall_the_loop(tiny_overrides, tmp_path):
    from actors.faults import SlowStatsGenerationWorker
    from tepo_ray.driver import STATS_TIMEOUT_S

    cfg = _cfg(tiny_overrides, tmp_path, "trainer.steps=2")
    recs = _steps(_train(cfg, generator_cls=SlowStatsGenerationWorker, generator_kwargs={"stats_delay_s": 120}))
    assert [r[K.STEP] for r in recs] == [1, 2] and recs[-1][K.STATS_TIMEOUTS] >= 2
    assert recs[-1][K.WALL] < 120, "a stuck stats call held the run"
