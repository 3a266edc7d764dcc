"""The multi-turn agent loop, on token ids end to end.

For each trajectory: generate until an action close tag (`</python>`,
`</search>`, `</answer>`) or EOS; on a tool call, run the tool asynchronously,
append `<result>…</result>` tokens with loss mask 0, and continue. Every limit
ends the trajectory cleanly with a recorded `finish_reason`:

* `engine.max_turns`     — tool calls per trajectory (a further call ends it: "max_turns")
* `engine.max_new_tokens`— generated tokens over all turns; also a turn of
                           `engine.max_turn_tokens` with no action ("max_new_tokens")
* `engine.max_context`   — prompt + generated + observation tokens ("max_context")

Prompts come from a `PromptBuilder` (the tokenizer's chat template with the
system prompt, or the tiny model's plain format). Sampled token ids are appended
as they are: the trained sequence is exactly the sampled one (no decode ->
re-encode drift). Tags may be several tokens: a turn stopped by a stop string
keeps the whole token that completed the close tag, even when that token
carries more characters (`>\n`); those stay in the sequence with loss mask 1,
and the observation ids (tokenised once, on their own) follow them. The turn's
text is only decoded to parse the action. Each token records the policy
version that generated it; weights may change between turns (`before_turn`).

Requests from every trajectory in flight (across groups) are batched into one
engine call by `EngineBatcher`, so tool latency of one group overlaps the
generation of others.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Protocol

from tepo_ray.agent import AnswerAction, Malformed, ToolAction, format_observation, parse_turn
from tepo_ray.agent.spans import turn_spans
from tepo_ray.data.tasks import render_prompt
from tepo_ray.records import Segment, ToolCall, Trajectory

__all__ = ["ToolRouter", "EngineBatcher", "AgentLoop", "ToolOutcome", "RolloutError"]


class RolloutError(RuntimeError):
    """A group in which some trajectory hit an engine error. Raised instead of returning the group:
    an error trajectory has no meaningful score, so it must be retried or counted as failed, never
    trained (with F1 = 0 it would get a negative advantage)."""


@dataclass
class ToolOutcome:
    observation: str
    error: str | None
    latency_s: float


class ToolRouter(Protocol):
    """Routes a call to the pool of its tool kind."""

    async def call(self, tool: str, argument: str) -> ToolOutcome: ...


def _sampled_version(engine: Any, default: int) -> int:
    """The weight version that sampled the last engine call, when the engine records it under its lock."""
    v = getattr(engine, "version_of_last_call", None)
    return default if v is None else int(v)


class EngineBatcher:
    """Collects generation requests from concurrent rollouts into one engine call.

    The engine is called from a single worker thread at a time, so engines need
    not be thread-safe. `before_batch` runs between engine calls, in the same worker
    thread pool (never on the event loop): where pending weights are applied, so a
    weight update never races a generation and never blocks admission or tool calls.

    Failure contract: every queued request gets a result or an exception. A failed
    `before_batch` is counted (`weight_load_failures`) and the batch runs on the weights
    really loaded (their version is recorded). A failed engine call is retried request
    by request, so one bad request fails only its own rollout (`engine_failures`).
    """

    def __init__(self, engine: Any, *, sampling: dict[str, Any], before_batch: Callable[[], None] | None = None,
                 linger_s: float = 0.003):
        """`linger_s`: how long to wait for more requests before an engine call. Tool results come
        back one by one; a few ms of linger turns many small engine calls into fewer larger ones."""
        self.engine = engine
        self.linger_s = linger_s
        self.sampling = sampling
        self.before_batch = before_batch
        self._queue: list[tuple[Any, asyncio.Future]] = []
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self.busy_s = 0.0
        self.tokens = 0
        self.calls = 0
        self.engine_failures = 0
        self.weight_load_failures = 0
        self.last_weight_load_error: str | None = None

    async def generate(self, request: Any) -> tuple[Any, int]:
        """Returns (GenerationOutput, version of the weights that sampled it)."""
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._run())
        fut = loop.create_future()
        self._queue.append((request, fut))
        assert self._wake is not None
        self._wake.set()
        return await fut

    async def _run(self) -> None:
        """Serve batches forever: no exception (weight load, engine, bookkeeping) ends this task, and
        every request taken from the queue gets a result or an exception, so no rollout waits forever."""
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            await asyncio.sleep(self.linger_s)  # let concurrent rollouts enqueue their turn
            batch, self._queue = self._queue, []
            if not batch:
                continue
            try:
                await self._serve(batch)
            except BaseException as exc:  # never leave a future unresolved (cancellation included)
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc if isinstance(exc, Exception) else RuntimeError(repr(exc)))
                if not isinstance(exc, Exception):
                    raise

    async def _serve(self, batch: list[tuple[Any, asyncio.Future]]) -> None:
        if self.before_batch is not None:
            # Off the event loop (a weight load takes seconds); engine calls are serial, so no race.
            # A failed load is counted and the batch runs on the current weights: the version recorded
            # below is the engine's real one, and the owner keeps the update pending for the next batch.
            try:
                await asyncio.to_thread(self.before_batch)
            except Exception as exc:
                self.weight_load_failures += 1
                self.last_weight_load_error = f"{type(exc).__name__}: {exc}"
        version = int(getattr(self.engine, "version", 0))
        t0 = time.perf_counter()
        try:
            outs = await asyncio.to_thread(self.engine.generate, [r for r, _ in batch], **self.sampling)
        except Exception as exc:
            self.engine_failures += 1
            if len(batch) == 1:
                if not batch[0][1].done():
                    batch[0][1].set_exception(exc)
                return
            # One bad request must not fail the others (across groups): retry each request alone.
            for req, fut in batch:
                try:
                    (out,) = await asyncio.to_thread(self.engine.generate, [req], **self.sampling)
                except Exception as one_exc:
                    if not fut.done():
                        fut.set_exception(one_exc)
                    continue
                version = _sampled_version(self.engine, version)
                self.tokens += len(out.token_ids)
                if not fut.done():
                    fut.set_result((out, version))
            return
        self.busy_s += time.perf_counter() - t0
        self.calls += 1
        # an engine wrapper that records the version under its lock (a weight update may land between
        # before_batch and the call) knows better than the version read above
        version = _sampled_version(self.engine, version)
        for (_, fut), out in zip(batch, outs):
            self.tokens += len(out.token_ids)
            if not fut.done():
                fut.set_result((out, version))


@dataclass
class _State:
    ids: list[int]
    loss_mask: list[int]
    versions: list[int]
    prompt_len: int
    segments: list[Segment] = field(default_factory=list)
    calls: list[ToolCall] = field(default_factory=list)
    generated: int = 0
    answer: str | None = None
    finish: str | None = None


class AgentLoop:
    """Runs groups of trajectories through the multi-turn loop (plain class; no Ray)."""

    def __init__(self, *, batcher: EngineBatcher, tokenizer: Any, tools: ToolRouter, engine_cfg: Any,
                 max_observation_chars: int, eos_token_id: int | None, prompts: Any = None):
        """`prompts`: a `tepo_ray.agent.prompts.PromptBuilder`; None = the plain `Question: …` format."""
        self.prompts = prompts
        self.batcher = batcher
        self.tok = tokenizer
        self.tools = tools
        self.cfg = engine_cfg
        self.max_obs_chars = max_observation_chars
        self.eos = eos_token_id

    def _encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    async def rollout_group(self, item: dict[str, Any], *, group_id: str, group_size: int) -> list[Trajectory]:
        """Samples `group_size` trajectories for one prompt, kept together as a group."""
        if self.prompts is not None:
            prompt_ids = self.prompts.prompt_ids(item["question"])
        else:
            prompt_ids = self._encode(render_prompt(item["question"]))
        trajs = await asyncio.gather(*[self._rollout_one(item, prompt_ids, group_id, i) for i in range(group_size)])
        errors = [t.meta.get("_engine_error", "engine error") for t in trajs if t.finish_reason == "error"]
        if errors:
            raise RolloutError(f"group {group_id}: {len(errors)}/{group_size} trajectories hit an engine error "
                               f"(first: {errors[0]})")
        return list(trajs)

    async def _rollout_one(self, item: dict[str, Any], prompt_ids: list[int], group_id: str, index: int) -> Trajectory:
        from tepo_ray.engines.base import GenerationRequest

        cfg = self.cfg
        st = _State(ids=list(prompt_ids), loss_mask=[0] * len(prompt_ids), versions=[-1] * len(prompt_ids),
                    prompt_len=len(prompt_ids))
        if len(prompt_ids) >= cfg.max_context:
            st.finish = "max_context"
        while st.finish is None:
            budget = min(cfg.max_turn_tokens, cfg.max_new_tokens - st.generated, cfg.max_context - len(st.ids))
            if budget <= 0:
                st.finish = "max_new_tokens" if cfg.max_new_tokens - st.generated <= 0 else "max_context"
                break
            try:
                out, version = await self.batcher.generate(
                    GenerationRequest(prompt_ids=list(st.ids), max_tokens=budget, request_id=f"{group_id}/{index}")
                )
            except Exception as exc:  # reported on the trajectory, never silently dropped
                st.finish = "error"
                st.answer = None
                item = {**item, "_engine_error": f"{type(exc).__name__}: {exc}"}
                break
            new = list(out.token_ids)
            start = len(st.ids)
            st.ids += new
            st.loss_mask += [1] * len(new)
            st.versions += [version] * len(new)
            st.generated += len(new)
            text = self.tok.decode(new, skip_special_tokens=False)
            action = parse_turn(text)
            seg = Segment(start, len(st.ids), None)
            # ΔH's reasoning tokens, from the sampled ids (decode offsets, not re-tokenised text)
            seg.reasoning_spans, seg.nontag_spans = turn_spans(self.tok, new, offset=start)
            if new:
                st.segments.append(seg)
            if isinstance(action, AnswerAction):
                st.answer, st.finish = action.answer, "answer"
            elif isinstance(action, (ToolAction, Malformed)) and (
                isinstance(action, ToolAction) or action.tool_attempt
            ):
                if len(st.calls) >= cfg.max_turns:
                    st.finish = "max_turns"
                    break
                if not new:
                    st.finish = "malformed"
                    break
                await self._call_tool(st, action, seg)
            elif isinstance(action, Malformed):
                st.finish = "malformed"
            else:  # NoAction
                if out.finish_reason == "eos" or (new and self.eos is not None and new[-1] == self.eos):
                    st.finish = "eos"
                elif st.generated >= cfg.max_new_tokens:
                    st.finish = "max_new_tokens"
                elif len(st.ids) >= cfg.max_context:
                    st.finish = "max_context"
                else:
                    st.finish = "max_new_tokens"  # a whole turn budget with no action
        traj = Trajectory(
            uid=f"{group_id}/{index}-{uuid.uuid4().hex[:6]}",
            group_id=group_id,
            prompt_id=str(item["id"]),
            token_ids=st.ids,
            loss_mask=st.loss_mask,
            versions=st.versions,
            prompt_len=st.prompt_len,
            segments=st.segments,
            tool_calls=st.calls,
            answer=st.answer,
            finish_reason=st.finish or "error",
            gold=list(item.get("answers", [])),
            task_type=item.get("task_type", "qa"),
            meta={k: v for k, v in item.items() if k.startswith("_")},
        )
        return traj.validate()

    async def _call_tool(self, st: _State, action: ToolAction | Malformed, seg: Segment) -> None:
        seg.tool_call_index = len(st.calls)
        if isinstance(action, ToolAction):
            outcome = await self.tools.call(action.tool, action.argument)
            call = ToolCall(tool=action.tool, argument=action.argument, observation=outcome.observation,
                            error=outcome.error, latency_s=outcome.latency_s, segment_index=len(st.segments) - 1)
        else:
            call = ToolCall(tool="invalid", argument="", observation=f"error: {action.reason}", error="malformed",
                            latency_s=0.0, segment_index=len(st.segments) - 1)
        st.calls.append(call)
        obs = call.observation[: self.max_obs_chars]
        obs_ids = self._encode(format_observation(obs))
        room = self.cfg.max_context - len(st.ids)
        if len(obs_ids) >= room:
            obs_ids = obs_ids[: max(room, 0)]
            st.finish = "max_context"
        st.ids += obs_ids
        st.loss_mask += [0] * len(obs_ids)
        st.versions += [-1] * len(obs_ids)


class CallableToolRouter:
    """A ToolRouter over plain callables (tests, local runs): tool -> fn(argument) -> observation."""

    def __init__(self, tools: dict[str, Callable[[str], Awaitable[ToolOutcome] | ToolOutcome]]):
        self._tools = tools

    async def call(self, tool: str, argument: str) -> ToolOutcome:
        fn = self._tools.get(tool)
        if fn is None:
            return ToolOutcome(f"error: tool '{tool}' is not available", "unavailable", 0.0)
        res = fn(argument)
        if asyncio.iscoroutine(res):
            res = await res
        return res  # type: ignore[return-value]

