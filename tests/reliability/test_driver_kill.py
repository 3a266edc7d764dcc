"""SIGKILL the driver process (`tepo-ray train`, which owns its local Ray) during training, then `--resume`.

The run continues from its last complete checkpoint: the step counter goes on from that step (no step is
logged twice, none is missing), the data cursor and the W&B run id continue, and every checkpoint on disk
is complete (its manifest matches its files) before and after.
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


@pytest.mark.timeout(1800)
def test_driver_sigkill_then_resume_continues_from_the_last_checkpoint(rel_cache: Path, tmp_path: Path) -> None:
    from tepo_ray.config import load_config, to_yaml
    from tepo_ray.prepare import prepare_data
    from tepo_ray.trainer.checkpoint import checkpoint_problem, list_checkpoints, load_latest

    run_dir = tmp_path / "run"
    cfg = load_config(CONFIG_FILES, [f"model.cache_dir={rel_cache}", "logging.wandb_mode=offline",
                                     f"logging.run_dir={run_dir}", "engine.name=hf", "async.max_staleness=1",
                                     "trainer.steps=6", "trainer.checkpoint_interval=1", "logging.progress=false"])
    prepare_data(cfg, progress=False)  # the SFT warm start, cached, before the clock starts
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(to_yaml(cfg))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": ""}
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

    res = subprocess.run([sys.executable, "-m", "tepo_ray.cli", "train", str(cfg_file), "--resume", str(run_dir)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-3000:])
    steps = _steps(run_dir)
    assert steps == [1, 2, 3, 4, 5, 6], steps  # steps after the checkpoint were redone once, none twice
    assert (run_dir / "wandb_id").read_text() == wandb_id  # the same W&B run continues
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 6
    final = load_latest(run_dir / "checkpoints")
    assert final is not None and final.step == 6 and checkpoint_problem(final.path) is None
