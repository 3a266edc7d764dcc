"""Fault- and delay-injecting actor variants, for tests and benchmarks only.

Each is the real actor class with one injected behaviour, named as such:

* `FaultInjectingGenerationWorker` — the process exits (`os._exit`) in its first
  `generate_group` call if the marker file does not exist yet (it creates it
  first), so exactly one crash happens across restarts.
* `FaultInjectingScorerWorker` — the same for `score`.
* `DelayInjectingGenerationWorker` — after the real rollout, sleeps for a
  long-tailed (log-normal) time per group, to emulate long generations in the
  async-vs-sync benchmark without a large model.
"""

from __future__ import annotations

import asyncio
import os
import random
from pathlib import Path
from typing import Any

from actors.entropy_scorer import EntropyScorerWorker
from actors.generation import GenerationWorker


def _crash_once(marker: str | None) -> None:
    if not marker:
        return
    path = Path(marker)
    if path.exists():
        return
    path.write_text(str(os.getpid()))
    os._exit(1)


class FaultInjectingGenerationWorker(GenerationWorker):
    def __init__(self, *, crash_marker: str | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.crash_marker = crash_marker

    async def generate_group(self, item: dict[str, Any], *, group_id: str, group_size: int) -> list[dict[str, Any]]:
        _crash_once(self.crash_marker)
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
        self._rng = random.Random(delay_seed)

    async def generate_group(self, item: dict[str, Any], *, group_id: str, group_size: int) -> list[dict[str, Any]]:
        out = await super().generate_group(item, group_id=group_id, group_size=group_size)
        import math

        delay = self.delay_median_s * math.exp(self.delay_sigma * self._rng.gauss(0.0, 1.0))
        await asyncio.sleep(delay)
        return out
