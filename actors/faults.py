"""Fault- and delay-injecting actor variants, for tests and benchmarks only.

Each is the real actor class with one injected behaviour, named as such:

* `FaultInjectingGenerationWorker` — the process exits (`os._exit`) in its first
  `generate_group` call if the marker file does not exist yet (it creates it
  first), so exactly one crash happens across restarts.
* `FaultInjectingScorerWorker` — the same for `score`.
* `DelayInjectingGenerationWorker` — after the real rollout, sleeps for a
  long-tailed (log-normal) time per group, to emulate long generations in the
  async-vs-sync benchmark without a large model. Each generator draws from its
  own stream, seeded by `(delay_seed, name)`, so replicas do not sleep in lockstep.
* `DelayInjectingLearnerWorker` — after the real optimizer step, sleeps for
  `train_delay_s` (plus an optional log-normal jitter), to emulate a larger
  learner; the sleep is counted in `learner/step_time_s` (the step took that
  long) and reported on its own as `faults/injected_train_delay_s`.

The reliability injectors below (failing weight loads, engine faults, kills, slow stats, NaN losses, a full
disk or a stalled write during a checkpoint) are used by `tests/reliability`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import math
import os
import random
import time
from pathlib import Path
from typing import Any

from actors.entropy_scorer import EntropyScorerWorker
from actors.generation import GenerationWorker
from actors.learner import LearnerWorker


def _crash_once(marker: str | None) -> None:
    if not marker:
        return
    path = Path(marker)
    if path.exists():
        return
    path.write_text(str(os.getpid()))
    os._exit(1)


class FaultInjectingGenerationWorker(GenerationWorker):
    """`crash_marker`: the process dies once; `fail_marker`: one call raises (the actor lives on)."""

    def __init__(self, *, crash_marker: str | None = None, fail_marker: str | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.crash_marker = crash_marker
        self.fail_marker = fail_marker

    async def generate_group(self, item: dict[str, Any], *, group_id: str, group_size: int) -> list[dict[str, Any]]:
        _crash_once(self.crash_marker)
        if self.fail_marker and not Path(self.fail_marker).exists():
            Path(self.fail_marker).write_text(group_id)
            raise RuntimeError(f"injected failure in generate_group({group_id})")
        return await super().generate_group(item, group_id=group_id, group_size=group_size)


class FaultInjectingScorerWorker(EntropyScorerWorker):
    def __init__(self, model_path: str, *, crash_marker: str | None = None, **kwargs: Any):
        super().__init__(model_path, **kwargs)
        self.crash_marker = crash_marker

    def score(self, trajectories: Any, **kwargs: Any) -> Any:
        _crash_once(self.crash_marker)
        return super().score(trajectories, **kwargs)


class DelayInjectingGenerationWorker(GenerationWorker):
    def __init__(self, *, delay_median_s: float = 0.5, delay_sigma: float = 0.8, delay_seed: int = 0,
                 **kwargs: Any):
        super().__init__(**kwargs)
        self.delay_median_s = delay_median_s
        self.delay_sigma = delay_sigma
        self._rng = random.Random(f"{delay_seed}/{self.name}")
        self.injected_delay_s = 0.0

    async def generate_group(self, item: dict[str, Any], *, group_id: str, group_size: int) -> list[dict[str, Any]]:
        out = await super().generate_group(item, group_id=group_id, group_size=group_size)
        delay = self.delay_median_s * math.exp(self.delay_sigma * self._rng.gauss(0.0, 1.0))
        self.injected_delay_s += delay
        await asyncio.sleep(delay)
        return out

    def stats(self) -> dict[str, Any]:
        return {**super().stats(), "injected_delay_s": self.injected_delay_s}


class DelayInjectingLearnerWorker(LearnerWorker):
    """The real learner, whose every step is made `train_delay_s` (x log-normal jitter) longer by a sleep."""

    def __init__(self, model_path: str, *, train_delay_s: float = 1.0, train_delay_sigma: float = 0.0,
                 delay_seed: int = 0, **kwargs: Any):
        super().__init__(model_path, **kwargs)
        if train_delay_s < 0 or train_delay_sigma < 0:
            raise ValueError(f"train_delay_s={train_delay_s!r}, train_delay_sigma={train_delay_sigma!r}; "
                             f"expected both >= 0")
        self.train_delay_s = train_delay_s
        self.train_delay_sigma = train_delay_sigma
        self._rng = random.Random(f"{delay_seed}/learner")

    def train_step(self, trajectories: Any) -> dict[str, float]:
        t0 = time.perf_counter()
        metrics = super().train_step(trajectories)
        delay = self.train_delay_s * math.exp(self.train_delay_sigma * self._rng.gauss(0.0, 1.0))
        time.sleep(delay)
        metrics["learner/step_time_s"] = time.perf_counter() - t0
        metrics["faults/injected_train_delay_s"] = delay
        return metrics


# --------------------------------------------------------------------------- reliability injectors
def _fire_once(marker: str | None) -> bool:
    """True the first time (creates the marker); False afterwards and when no marker is given."""
    if not marker or Path(marker).exists():
        return False
    Path(marker).write_text(str(os.getpid()))
    return True


class FailingWeightLoadGenerationWorker(GenerationWorker):
    def __init__(self, *, fail_loads: int = 1, load_delay_s: float = 0.0, **kwargs: Any):
        super().__init__(**kwargs)
        self.injected_load_failures_left = int(fail_loads)
        real_update = self.engine.update_weights

        self.load_windows: list[tuple[float, float]] = []  # (start, end) perf_counter of each load attempt

        def update_weights(path: str, *, version: int) -> None:
            t0 = time.perf_counter()
            time.sleep(load_delay_s)
            self.load_windows.append((t0, time.perf_counter()))
            if self.injected_load_failures_left > 0:
                self.injected_load_failures_left -= 1
                raise OSError(f"injected weight-load failure for version {version} ({path})")
            real_update(path, version=version)

        self.engine.update_weights = update_weights  # type: ignore[method-assign]


class EngineFaultGenerationWorker(GenerationWorker):
    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        real_generate = self.engine.generate

        def generate(requests: Any, **sampling: Any) -> Any:
            if any("poison" in (r.request_id or "") for r in requests):
                raise RuntimeError("injected engine exception (a poisoned request is in this batch)")
            outs = real_generate(requests, **sampling)
            return [dataclasses.replace(out, token_ids=[], finish_reason="length", stop_token=None, logprobs=None)
                    if "empty" in (r.request_id or "") else out for r, out in zip(requests, outs)]

        self.engine.generate = generate  # type: ignore[method-assign]


class KillingGenerationWorker(GenerationWorker):
    def __init__(self, *, kill_marker: str, kill_on: str = "batch", **kwargs: Any):
        super().__init__(**kwargs)
        if kill_on not in ("batch", "weight_load"):
            raise ValueError(f"kill_on={kill_on!r}; expected 'batch' or 'weight_load'")
        name = "generate" if kill_on == "batch" else "update_weights"
        real = getattr(self.engine, name)

        def killing(*args: Any, **kw: Any) -> Any:
            if _fire_once(kill_marker):
                os._exit(1)
            return real(*args, **kw)

        setattr(self.engine, name, killing)


class SlowStatsGenerationWorker(GenerationWorker):
    def __init__(self, *, stats_delay_s: float = 30.0, **kwargs: Any):
        super().__init__(**kwargs)
        self.stats_delay_s = stats_delay_s

    async def stats(self) -> dict[str, Any]:  # type: ignore[override]
        await asyncio.sleep(self.stats_delay_s)
        return super().stats()


class KillingLearnerWorker(LearnerWorker):
    def __init__(self, model_path: str, *, kill_marker: str, kill_at_step: int = 2, when: str = "between",
                 **kwargs: Any):
        super().__init__(model_path, **kwargs)
        if when not in ("between", "mid"):
            raise ValueError(f"when={when!r}; expected 'between' or 'mid'")
        self.kill_marker, self.kill_at_step, self.when = kill_marker, int(kill_at_step), when
        real_apply = self.learner.apply_update

        def apply_update(**kw: Any) -> Any:
            if self.when == "mid" and self.learner.step + 1 == self.kill_at_step and _fire_once(self.kill_marker):
                os._exit(1)  # gradients computed, optimizer not stepped, nothing published
            return real_apply(**kw)

        self.learner.apply_update = apply_update  # type: ignore[method-assign]

    def train_step(self, trajectories: Any) -> dict[str, float]:
        if self.when == "between" and self.learner.step + 1 == self.kill_at_step and _fire_once(self.kill_marker):
            os._exit(1)
        return super().train_step(trajectories)


class NonFiniteLearnerWorker(LearnerWorker):
    def __init__(self, model_path: str, *, nan_steps: tuple[int, ...] = (2,), **kwargs: Any):
        super().__init__(model_path, **kwargs)
        self.nan_steps = {int(x) for x in nan_steps}
        real_loss = self.learner.compute_loss

        def compute_loss(**kw: Any) -> Any:
            loss, metrics = real_loss(**kw)
            if self.learner.step + 1 in self.nan_steps:
                loss = loss * math.nan  # the loss and every gradient become NaN
            return loss, metrics

        self.learner.compute_loss = compute_loss  # type: ignore[method-assign]


class DiskFullCheckpointLearnerWorker(LearnerWorker):
    def __init__(self, model_path: str, *, full_at: int = 2, **kwargs: Any):
        super().__init__(model_path, **kwargs)
        self.full_at = int(full_at)
        self.checkpoint_writes = 0

    def save_checkpoint(self, extra: dict[str, Any] | None = None) -> str:
        self.checkpoint_writes += 1
        if self.checkpoint_writes != self.full_at:
            return super().save_checkpoint(extra)

        def disk_full(*_args: Any, **_kw: Any) -> None:
            raise OSError(errno.ENOSPC, "No space left on device (injected)")

        return self.learner.save_checkpoint(extra, on_file_written=disk_full)


class StallingCheckpointLearnerWorker(LearnerWorker):
    """Its `stall_at`-th checkpoint write stops after the first entry is written: it creates `marker` (holding
    the temporary checkpoint directory being written) and sleeps `stall_s`, so a test can SIGKILL the run
    while that write is half done."""

    def __init__(self, model_path: str, *, marker: str, stall_at: int = 3, stall_s: float = 600.0,
                 **kwargs: Any):
        super().__init__(model_path, **kwargs)
        self.marker, self.stall_at, self.stall_s = marker, int(stall_at), float(stall_s)
        self.checkpoint_writes = 0

    def save_checkpoint(self, extra: dict[str, Any] | None = None) -> str:
        self.checkpoint_writes += 1
        if self.checkpoint_writes != self.stall_at:
            return super().save_checkpoint(extra)
        stalled = False

        def stall(entry: str) -> None:
            nonlocal stalled
            if stalled:
                return
            stalled = True
            ckpt_dir = Path(self.learner.checkpoint_dir)
            partial = sorted(str(p) for p in ckpt_dir.glob(".tmp-step_*"))
            Path(self.marker).write_text("\n".join([entry, *partial]))
            time.sleep(self.stall_s)

        return self.learner.save_checkpoint(extra, on_file_written=stall)
