"""GenerationActor: runs the multi-turn agent loop (tepo_ray.rollout) on one engine.

A plain class first (`GenerationWorker`), made a Ray actor by the driver with
`ray.remote(GenerationWorker)`. It is an async actor: many groups are in flight
at once and their turns are batched into one engine call. Weights change only
between engine calls (between turns), and every generated token records the
version that sampled it:

* `file` updates: `set_weights` records the newest one; it is applied before
  the next engine call, so generation never waits for the learner;
* `collective` updates: the learner is broadcasting now, so `set_weights`
  receives at once — after the engine call in progress, if any, finishes (the
  engine lock is taken before the batch's version is read and released when
  its `generate` returns, so a batch is sampled by exactly the version it records).
"""

from __future__ import annotations

import asyncio
import threading
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


class _LockedEngine:
    """The engine as the batcher sees it: each `generate` holds the engine lock (a collective weight receive
    waits for it) and records the weight version that sampled it (`version_of_last_call`)."""

    def __init__(self, engine: Any, lock: threading.Lock):
        self._engine = engine
        self._lock = lock
        self.version_of_last_call: int | None = None

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            self.version_of_last_call = int(self._engine.version)
            return self._engine.generate(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)


class GenerationWorker:
    def __init__(self, *, engine_cfg: Any, model_path: str, pools: dict[str, Any], max_observation_chars: int,
                 name: str = "generator-0", prompt_cfg: Any = None):
        """`prompt_cfg`: the `prompt` config section (None: defaults — chat template when the tokenizer has one)."""
        from transformers import AutoTokenizer

        from tepo_ray.agent import stop_conditions
        from tepo_ray.agent.prompts import PromptBuilder
        from tepo_ray.engines import make_engine

        self.name = name
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.engine = make_engine(engine_cfg, model_path=model_path)
        stops, stop_texts = stop_conditions(self.tokenizer)  # ids when tags are single tokens, else strings
        if self.tokenizer.eos_token_id is not None:
            stops.append(self.tokenizer.eos_token_id)
        self._pending: tuple[Any, int] | None = None
        self._rewind = False
        self._created = time.time()
        self.weight_loads = 0
        self._engine_lock = threading.Lock()  # held from before_batch until the batch's generate returns
        sampling = dict(temperature=engine_cfg.temperature, top_p=engine_cfg.top_p, stop_token_ids=stops,
                        stop=stop_texts)
        self.batcher = EngineBatcher(_LockedEngine(self.engine, self._engine_lock), sampling=sampling,
                                     before_batch=self._apply_pending)
        self.loop = AgentLoop(batcher=self.batcher, tokenizer=self.tokenizer,
                              tools=PoolToolRouter(pools, max_observation_chars=max_observation_chars),
                              engine_cfg=engine_cfg, max_observation_chars=max_observation_chars,
                              eos_token_id=self.tokenizer.eos_token_id,
                              prompts=PromptBuilder.from_config(self.tokenizer, prompt_cfg))

    def ready(self) -> dict[str, Any]:
        return {"name": self.name, "version": int(self.engine.version)}

    def join_weight_group(self, info: dict[str, Any], rank: int) -> int:
        """Join the learner's weight group as ranks rank..rank+weight_ranks-1 (blocks until all joined)."""
        self.engine.join_weight_group(info, rank=rank)
        return rank

    def weight_ranks(self) -> int:
        return int(self.engine.weight_ranks)

    def sequence_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        """Teacher-forced log-probs under the engine's current weights (checks a weight sync)."""
        with self._engine_lock:
            return self.engine.sequence_logprobs(sequences)

    async def set_weights(self, source: Any, version: int, *, rewind: bool = False) -> None:
        """New weights: a `WeightUpdate` dict (or a file path).

        Collective: received now, in a worker thread (the learner's broadcast is under way; the event loop
        keeps serving tool results meanwhile); the receive waits for the engine call in progress and is
        loaded at once, whatever its version (a rewind is just an older update). File: recorded and loaded
        before the next engine call (off the event loop). `rewind=True` (after the learner restored an
        older checkpoint) replaces any pending or loaded newer version: those weights belong to a
        discarded timeline."""
        if isinstance(source, dict) and source.get("kind") == "collective":
            await asyncio.to_thread(self._receive_now, source, version)
            return
        if rewind or self._pending is None or version > self._pending[1]:
            self._pending = (source, version)
            self._rewind = rewind

    def _receive_now(self, update: dict[str, Any], version: int) -> None:
        with self._engine_lock:  # waits for the engine call in progress
            try:
                self.engine.update_weights(update, version=version)
            except Exception as exc:
                # keep the group in step: a rank living in this process (an in-process engine) that failed
                # before it took the buckets takes and drops them now (a no-op when its ranks live in other
                # processes, or when it already received); the failure is counted and reported to the driver
                from tepo_ray.weights import WeightUpdate
                from tepo_ray.weights.collective import drain_unreceived

                self.batcher.weight_load_failures += 1
                self.batcher.last_weight_load_error = f"{type(exc).__name__}: {exc}"
                drain_unreceived(WeightUpdate.from_dict(update))
                raise
        self.weight_loads += 1

    def _apply_pending(self) -> None:
        """Load the pending file weights (in the batcher's worker thread, before an engine call). Cleared
        only after a successful load: a failed load is retried before the next batch instead of being
        forgotten."""
        pending = self._pending
        if pending is None:
            return
        with self._engine_lock:
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
