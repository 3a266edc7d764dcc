"""GenerationActor: runs the multi-turn agent loop (tepo_ray.rollout) on one engine.

A plain class first (`GenerationWorker`), made a Ray actor by the driver with
`ray.remote(GenerationWorker)`. It is an async actor: many groups are in flight
at once and their turns are batched into one engine call; `set_weights` only
records the newest version, which is applied between engine calls (between
turns), so generation never waits for the learner.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from tepo_ray.rollout import AgentLoop, EngineBatcher, ToolOutcome


class PoolToolRouter:
    """Routes tool calls to the ToolPool actors of each kind."""

    def __init__(self, pools: dict[str, Any], *, max_observation_chars: int):
        self.pools = pools
        self.max_chars = max_observation_chars

    async def call(self, tool: str, argument: str) -> ToolOutcome:
        pool = self.pools.get(tool)
        if pool is None:
            return ToolOutcome(f"error: tool '{tool}' is not available (no '{tool}' pool)", "unavailable", 0.0)
        t0 = time.perf_counter()
        try:
            res = await pool.call.remote(argument)
        except Exception as exc:  # the pool itself failed: an error observation, the trajectory goes on
            return ToolOutcome(f"error: {tool} pool failed ({type(exc).__name__})", "pool_failure",
                               time.perf_counter() - t0)
        return ToolOutcome(res.observation, res.error, res.latency_s)


class GenerationWorker:
    def __init__(self, *, engine_cfg: Any, model_path: str, pools: dict[str, Any], max_observation_chars: int,
                 name: str = "generator-0"):
        from transformers import AutoTokenizer

        from tepo_ray.agent import stop_token_ids
        from tepo_ray.engines import make_engine

        self.name = name
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.engine = make_engine(engine_cfg, model_path=model_path)
        stops = stop_token_ids(self.tokenizer)
        if self.tokenizer.eos_token_id is not None:
            stops.append(self.tokenizer.eos_token_id)
        self._pending: tuple[str, int] | None = None
        self._rewind = False
        self._created = time.time()
        self.weight_loads = 0
        sampling = dict(temperature=engine_cfg.temperature, top_p=engine_cfg.top_p, stop_token_ids=stops)
        self.batcher = EngineBatcher(self.engine, sampling=sampling, before_batch=self._apply_pending)
        self.loop = AgentLoop(batcher=self.batcher, tokenizer=self.tokenizer,
                              tools=PoolToolRouter(pools, max_observation_chars=max_observation_chars),
                              engine_cfg=engine_cfg, max_observation_chars=max_observation_chars,
                              eos_token_id=self.tokenizer.eos_token_id)

    def ready(self) -> dict[str, Any]:
        return {"name": self.name, "version": int(self.engine.version)}

    async def set_weights(self, path: str, version: int, *, rewind: bool = False) -> None:
        """Record the newest weights; applied before the next engine call (off the event loop).

        `rewind=True` (after the learner restored an older checkpoint) replaces any pending or loaded
        newer version: those weights belong to a discarded timeline."""
        if rewind or self._pending is None or version > self._pending[1]:
            self._pending = (path, version)
            self._rewind = rewind

    def _apply_pending(self) -> None:
        """Load the pending weights. Cleared only after a successful load: a failed load is retried
        before the next batch instead of being forgotten."""
        pending = self._pending
        if pending is None:
            return
        if pending[1] > int(self.engine.version) or (self._rewind and pending[1] != int(self.engine.version)):
            self.engine.update_weights(pending[0], version=pending[1])
            self.weight_loads += 1
        if self._pending is pending:  # a newer set_weights during the load stays pending
            self._pending = None
            self._rewind = False

    async def generate_group(self, item: dict[str, Any], *, group_id: str, group_size: int) -> list[dict[str, Any]]:
        trajs = await self.loop.rollout_group(item, group_id=group_id, group_size=group_size)
        return [t.to_dict() for t in trajs]

    async def generate_groups(self, items: list[dict[str, Any]], *, group_ids: list[str],
                              group_size: int) -> list[list[dict[str, Any]]]:
        return list(await asyncio.gather(*[self.generate_group(it, group_id=g, group_size=group_size)
                                           for it, g in zip(items, group_ids)]))

    def stats(self) -> dict[str, Any]:
        alive = time.time() - self._created
        return {"busy_s": self.batcher.busy_s, "tokens": self.batcher.tokens, "engine_calls": self.batcher.calls,
                "alive_s": alive, "version": int(self.engine.version), "weight_loads": self.weight_loads,
                "weight_load_failures": self.batcher.weight_load_failures,
                "engine_failures": self.batcher.engine_failures}

    def shutdown(self) -> None:
        self.engine.shutdown()
