"""SIGKILL the driver process (`tepo-ray train`, which owns its local Ray) during training, and again while
a checkpoint is half written, then `--resume`.

The run continues from its last complete checkpoint: the step counter goes on from that step (no step is
logged twice, none is missing), the data cursor and the W&B run id continue, and every checkpoint on disk
is complete (its manifest matches its files) before and after; the half-written one is never listed or
loaded, and the resumed run clears it away.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
CONFIG_FILES = [ROOT / "experiments" / "configs" / name for name in ("demo.yaml", "tiny.yaml")]


def _kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL the driver's whole session (the driver and the Ray processes it started)."""
    import psutil

    sid = os.getsid(proc.pid)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    for p in psutil.process_iter(["pid"]):
        try:
            if os.getsid(p.pid) == sid:
                p.kill()
        except (ProcessLookupError, PermissionError, psutil.Error):
            pass


def _steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [int(json.loads(line)["step"]) for line in path.read_text().splitlines() if line.strip()]


def _six_step_run(rel_cache: Path, tmp_path: Path) -> tuple[Path, Path, dict[str, str]]:
    """(run dir, config file, env) of a 6-step run that checkpoints every step; the SFT warm start is cached
    before any clock starts."""
    from tepo_ray.config import load_config, to_yaml
    from tepo_ray.prepare import prepare_data

    run_dir = tmp_path / "run"
    cfg = load_config(CONFIG_FILES, [f"model.cache_dir={rel_cache}", "logging.wandb_mode=offline",
                                     f"logging.run_dir={run_dir}", "engine.name=hf", "async.max_staleness=1",
                                     "trainer.steps=6", "trainer.checkpoint_interval=1", "logging.progress=false"])
    prepare_data(cfg, progress=False)
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(to_yaml(cfg))
    return run_dir, cfg_file, {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": ""}


def _resume_to_the_end(run_dir: Path, cfg_file: Path, env: dict[str, str], wandb_id: str) -> None:
    from tepo_ray.trainer.checkpoint import checkpoint_problem, load_latest

    res = subprocess.run([sys.executable, "-m", "tepo_ray.cli", "train", str(cfg_file), "--resume", str(run_dir)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-3000:])
    steps = _steps(run_dir)
    assert steps == [1, 2, 3, 4, 5, 6], steps  # steps after the checkpoint were redone once, none twice
    assert (run_dir / "wandb_id").read_text() == wandb_id  # the same W&B run continues
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 6
    final = load_latest(run_dir / "checkpoints")
    assert final is not None and final.step == 6 and checkpoint_problem(final.path) is None
    assert not list((run_dir / "checkpoints").glob(".tmp-*")), "a half-written checkpoint was left behind"


@pytest.mark.timeout(1800)
def test_driver_sigkill_then_resume_continues_from_the_last_checkpoint(rel_cache: Path, tmp_path: Path) -> None:
    """SIGKILL the driver's session after step 3 of 6, then `tepo-ray train --resume`: steps 1-6 logged exactly
    once, the same W&B run id, every checkpoint on disk complete before and after."""
    from tepo_ray.trainer.checkpoint import checkpoint_problem, list_checkpoints, load_latest

    run_dir, cfg_file, env = _six_step_run(rel_cache, tmp_path)
    log = tmp_path / "first.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "tepo_ray.cli", "train", str(cfg_file)], cwd=ROOT, env=env,
                                stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 900
        while len(_steps(run_dir)) < 3:  # killed mid-run, after a few steps and checkpoints
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the run did not reach step 3"
            time.sleep(0.5)
    finally:
        _kill_session(proc)
    killed_at = _steps(run_dir)
    assert 3 <= len(killed_at) < 6, killed_at
    wandb_id = (run_dir / "wandb_id").read_text()
    found = list_checkpoints(run_dir / "checkpoints")
    assert found and all(checkpoint_problem(p) is None for _, p in found)  # nothing half-written is listed
    last = load_latest(run_dir / "checkpoints")
    assert last is not None and last.step >= 2
    _resume_to_the_end(run_dir, cfg_file, env, wandb_id)


# The first run, started like `tepo-ray train` but with the learner's third checkpoint write stalling half way
# (actors.faults.StallingCheckpointLearnerWorker), so the SIGKILL lands inside that write.
_STALLING_RUN = """
import sys
from actors.faults import StallingCheckpointLearnerWorker
from tepo_ray.config import load_config
from tepo_ray.driver import train
train(load_config([sys.argv[1]]), learner_cls=StallingCheckpointLearnerWorker,
      learner_kwargs={"marker": sys.argv[2], "stall_at": 3})
"""


@pytest.mark.timeout(1800)
def test_driver_sigkill_inside_a_checkpoint_write_then_resume(rel_cache: Path, tmp_path: Path) -> None:
    """SIGKILL the driver's session while the learner is half way through writing checkpoint 3 (its temporary
    directory on disk): only steps 1-2 are listed, `latest` loads step 2, `--resume` redoes step 3 once,
    finishes at 6 and clears the half-written directory."""
    from tepo_ray.trainer.checkpoint import checkpoint_problem, list_checkpoints, load_latest

    run_dir, cfg_file, env = _six_step_run(rel_cache, tmp_path)
    marker = tmp_path / "stalled"
    log = tmp_path / "first.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-c", _STALLING_RUN, str(cfg_file), str(marker)], cwd=ROOT,
                                env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 900
        while not marker.exists():
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the third checkpoint write never started"
            time.sleep(0.2)
        time.sleep(0.5)
    finally:
        _kill_session(proc)
    entry, *partial = marker.read_text().splitlines()
    ckpt_dir = run_dir / "checkpoints"
    # The kill landed inside the write of step 3: its temporary directory exists, holding a part of it.
    assert [Path(p).name for p in partial] == [p.name for p in ckpt_dir.glob(".tmp-step_3-*")], partial
    assert partial and (Path(partial[0]) / entry).exists()
    assert [step for step, _ in list_checkpoints(ckpt_dir)] == [1, 2]  # the half-written one is not listed
    assert all(checkpoint_problem(p) is None for _, p in list_checkpoints(ckpt_dir))
    last = load_latest(ckpt_dir)
    assert last is not None and last.step == 2 and last.note is None  # `latest` still names step 2
    assert _steps(run_dir)[:3] == [1, 2, 3]  # step 3 trained and logged: the resume redoes it once
    _resume_to_the_end(run_dir, cfg_file, env, (run_dir / "wandb_id").read_text())
