"""Tool-execution pools: one `ToolPool` per tool kind, each a manager of N worker actors.

    caller (GenerationActor / driver)                     pool event-loop thread
    ── await pool.call(arg) ──► FIFO wait for a slot ──► worker.execute.remote(arg, timeout)
                                  (back-pressure:            │ answered    -> ToolCallResult
                                   workers x max_inflight)   │ too slow    -> kill + replace, error observation
                                                             │ worker died -> replace, retry once, else error

`ToolPool` is a plain class. It runs its own asyncio loop on a daemon thread, so
`await pool.call(...)` works from any event loop (an async Ray actor, `asyncio.run`
in a test) and `pool.call_sync(...)` / `pool.map(...)` from plain threads. To
share one pool between several generation actors, make the pool itself an actor
(`ToolPool.remote_from_config(...)`, a zero-CPU async manager actor) and call
`await pool.call.remote(arg)`.

Workers (`PythonToolWorker`, `SearchToolWorker`) are plain classes with a
`ready()`; the pool turns them into actors with `ray.remote` at creation. Each
worker actor runs up to `max_inflight_per_worker` calls on threads, plus a
one-thread "control" concurrency group for `ready()`/`stats()`, so a health
ping is answered while calls run. Actor restarts are the pool's job (workers
are created with `max_restarts=0`): it notices a dead worker when a call fails
or a health ping does, kills what is left of it and starts a fresh one.

Placement: every worker asks for `topology.<role>.num_cpus` / `num_gpus`; with a
placement group it goes to the given bundle indices (the one holding the fewest
live workers of this pool), otherwise Ray places it freely.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import re
import threading
import time
from collections import deque
from typing import Any, Awaitable, Callable, ClassVar, Iterable, Mapping, Sequence, TypeVar

from tepo_ray.config import ConfigError
from tepo_ray.tools.pool_core import (
    METRIC_NAMES,
    BusyClock,
    LatencyWindow,
    PeakWindow,
    PoolSettings,
    ToolCallResult,
    ToolKind,
    WorkerReply,
    WorkerSecondsClock,
    autoscale_target,
    busy_fraction,
    error_observation,
    metric_key,
    timeout_reason,
)

__all__ = [
    "CONTROL_GROUP",
    "ToolPoolError",
    "ToolWorker",
    "PythonToolWorker",
    "SearchToolWorker",
    "TOOL_WORKERS",
    "register_tool_worker",
    "ToolPool",
    "config_kwargs",
]

log = logging.getLogger(__name__)

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
CONTROL_GROUP = "control"  # concurrency group for ready()/stats(): never queued behind calls

T = TypeVar("T")


class ToolPoolError(RuntimeError):
    """The pool cannot do what was asked (workers cannot start, pool closed, bad argument)."""


# =========================================================================== workers
class ToolWorker:
    """Base of the worker classes: counts calls and concurrent executions.

    Subclasses implement `_run(argument, timeout_s) -> WorkerReply`. `execute` may
    be called from several threads at once (the actor's call group has
    `max_inflight_per_worker` threads); `stats()["peak_active"]` is the most
    calls this worker ever executed at the same time.
    """

    tool: ClassVar[str] = "tool"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active = 0
        self._peak_active = 0
        self._calls = 0

    def ready(self) -> dict[str, Any]:
        """Health ping (answered from the control thread while calls run): tool, pid, placement group."""
        info: dict[str, Any] = {"tool": self.tool, "pid": os.getpid(), "placement_group": None}
        try:
            import ray

            if ray.is_initialized():
                pg = ray.get_runtime_context().get_placement_group_id()
                info["placement_group"] = pg
        except Exception:  # noqa: BLE001 - a plain (non-actor) worker has no runtime context
            pass
        return info

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "tool": self.tool,
                "pid": os.getpid(),
                "calls": self._calls,
                "active": self._active,
                "peak_active": self._peak_active,
            }

    def execute(self, argument: str, timeout_s: float) -> WorkerReply:
        """Run one call; `timeout_s` is the tool's own limit (the pool waits a little longer)."""
        with self._lock:
            self._active += 1
            self._calls += 1
            self._peak_active = max(self._peak_active, self._active)
        t0 = time.perf_counter()
        try:
            reply = self._run(argument, timeout_s)
        finally:
            with self._lock:
                self._active -= 1
        reply.duration_s = time.perf_counter() - t0
        return reply

    def _run(self, argument: str, timeout_s: float) -> WorkerReply:
        raise NotImplementedError

    def close(self) -> None:
        """Release external resources (subprocesses, index files)."""


def _get_field(cfg: Any, name: str) -> Any:
    return cfg.get(name) if isinstance(cfg, Mapping) else getattr(cfg, name, None)


def _plain_config(cfg: Any) -> Any:
    """DictConfig -> its dataclass object (actors get plain, picklable configs)."""
    try:
        from omegaconf import DictConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        return cfg
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_object(cfg)
    return cfg


class PythonToolWorker(ToolWorker):
    """Runs `<python>` snippets in the resource-limited `PythonSandbox` (one per worker).

    The sandbox is safe from many threads (it starts extra warm fork servers on
    demand), so the worker's `max_inflight_per_worker` threads share it.
    `WorkerReply.error` is the sandbox's `SandboxErrorKind` value ("timeout",
    "exception", "memory", ...) or None; the observation is `format_observation`
    cut to `tools.max_observation_chars`.
    """

    tool = ToolKind.PYTHON.value

    def __init__(self, cfg: Any, *, max_observation_chars: int = 400, concurrency: int = 1) -> None:
        super().__init__()
        from tepo_ray.tools import python_sandbox  # lazy: only python workers need it

        self._format = python_sandbox.format_observation
        self._max_chars = int(max_observation_chars)
        self._sandbox = python_sandbox.PythonSandbox.from_config(_plain_config(cfg))

    def _run(self, argument: str, timeout_s: float) -> WorkerReply:
        result = self._sandbox.run(argument, timeout_s=timeout_s)
        error = None if result.error is None else str(getattr(result.error, "value", result.error))
        return WorkerReply(observation=self._format(result, max_chars=self._max_chars), error=error,
                           timed_out=bool(result.timed_out))

    def close(self) -> None:
        self._sandbox.close()


class SearchToolWorker(ToolWorker):
    """Answers `<search>` queries from a local index (BM25 by default, chroma or faiss).

    Observation: Search-R1's "Doc i(Title: ...) text" lines, each doc's text cut to
    `tools.search.max_doc_chars`, the whole cut to `max_observation_chars`; a blank query gets
    "No results found.". Retrievers are thread-safe, so concurrent calls share one.

    One index per node: bm25 and faiss indexes are memory-mapped read-only, so every search
    worker on a machine shares one copy of the index in the page cache; a worker adds only its
    own state (doc-store connection, scores buffer, query encoder for dense backends). The query
    encoder runs on `tools.search.encoder_device` (a GPU is only needed if that says cuda).
    """

    tool = ToolKind.SEARCH.value

    def __init__(self, cfg: Any, *, max_observation_chars: int = 400, concurrency: int = 1) -> None:
        super().__init__()
        from tepo_ray.tools import retrieval

        cfg = _plain_config(cfg)
        if not cfg.index_dir:
            raise ConfigError(
                "tools.search.index_dir is null; build an index first (tepo_ray.tools.retrieval.build_index) "
                "and set tools.search.index_dir to it"
            )
        self._retrieval = retrieval
        self._top_k = int(cfg.top_k)
        self._doc_chars = int(cfg.max_doc_chars)
        self._max_chars = int(max_observation_chars)
        options: dict[str, Any] = {}
        if cfg.backend == "bm25":
            options = {"preload": bool(cfg.preload)}
        elif cfg.backend == "faiss":
            options = {"preload": bool(cfg.preload), "device": cfg.encoder_device, "nprobe": int(cfg.faiss_nprobe),
                       "ef_search": int(cfg.faiss_ef_search), "use_gpu": bool(cfg.faiss_use_gpu)}
        self._retriever = retrieval.open_retriever(
            cfg.index_dir, backend=cfg.backend, embedding_model=cfg.embedding_model, **options
        )

    def _run(self, argument: str, timeout_s: float) -> WorkerReply:
        hits = self._retriever.search([argument], top_k=self._top_k)[0]
        text = self._retrieval.format_hits(hits, max_chars=self._doc_chars)
        return WorkerReply(observation=_clip(text, self._max_chars))

    def close(self) -> None:
        self._retriever.close()


def _clip(text: str, max_chars: int) -> str:
    return text if len(text) <= max_chars else text[: max(0, max_chars - 3)] + "..."


# Registry: tool name -> worker class (STYLE: variation by registration, not flags).
TOOL_WORKERS: dict[str, type[ToolWorker]] = {
    ToolKind.PYTHON.value: PythonToolWorker,
    ToolKind.SEARCH.value: SearchToolWorker,
}


def register_tool_worker(name: str) -> Callable[[type[ToolWorker]], type[ToolWorker]]:
    """Class decorator: make `ToolPool.from_config(name, ...)` build pools of this worker."""

    def deco(cls: type[ToolWorker]) -> type[ToolWorker]:
        TOOL_WORKERS[name] = cls
        return cls

    return deco


def _worker_class(tool: str) -> type[ToolWorker]:
    try:
        return TOOL_WORKERS[tool]
    except KeyError:
        raise ConfigError(f"unknown tool {tool!r}; expected one of {sorted(TOOL_WORKERS)}") from None


# =========================================================================== pool
def config_kwargs(
    tool: str | ToolKind,
    tools: Any,
    resources: Any,
    *,
    placement_group: Any = None,
    bundle_indices: int | Sequence[int] | None = None,
    worker_cls: type[ToolWorker] | None = None,
    **settings_overrides: Any,
) -> dict[str, Any]:
    """`ToolPool(**kwargs)` for `tool` from `cfg.tools` and the role's `RoleResources` (see `from_config`)."""
    name = tool.value if isinstance(tool, ToolKind) else str(tool)
    cls_ = worker_cls or _worker_class(name)
    tool_cfg = _get_field(tools, name)
    if tool_cfg is None:
        raise ConfigError(f"tools.{name} is missing; expected a section per tool ({sorted(TOOL_WORKERS)})")
    if name == ToolKind.SEARCH.value and worker_cls is None and not _get_field(tool_cfg, "index_dir"):
        raise ConfigError(
            "tools.search.index_dir is null; build an index first (tepo_ray.tools.retrieval.build_index) "
            "and set tools.search.index_dir to it"
        )
    inflight = int(_get_field(tools, "max_inflight_per_worker"))
    settings = PoolSettings.from_tool_config(tool_cfg, tool=name, max_inflight_per_worker=inflight,
                                             **settings_overrides)
    return dict(
        settings=settings,
        worker_cls=cls_,
        worker_kwargs={"cfg": _plain_config(tool_cfg),
                       "max_observation_chars": int(_get_field(tools, "max_observation_chars")),
                       "concurrency": inflight},
        num_cpus=float(resources.num_cpus),
        num_gpus=float(resources.num_gpus),
        placement_group=placement_group,
        bundle_indices=bundle_indices,
        role=f"{name}_tools",
    )


class _PoolClosed(Exception):
    pass


class _NoWorkers(Exception):
    pass


@dataclasses.dataclass(eq=False)
class _Slot:
    """One worker actor as the pool sees it."""

    id: int
    bundle: int | None
    handle: Any = None
    state: str = "starting"  # starting -> active -> (draining) -> dead
    inflight: int = 0
    pid: int | None = None
    busy: BusyClock = dataclasses.field(default_factory=BusyClock)
    checking: bool = False  # a health ping is in flight


class ToolPool:
    """A pool of worker actors for one tool, with back-pressure, timeouts, restarts and metrics.

    Build it with `ToolPool.from_config(tool, tools_cfg, topology_role)` or directly
    with a worker class and `PoolSettings`. Close it (`close()` or `with`): the
    worker actors are killed.
    """

    def __init__(
        self,
        *,
        settings: PoolSettings,
        worker_cls: type[ToolWorker],
        worker_kwargs: Mapping[str, Any] | None = None,
        num_cpus: float = 1.0,
        num_gpus: float = 0.0,
        placement_group: Any = None,
        bundle_indices: int | Sequence[int] | None = None,
        role: str | None = None,
    ) -> None:
        import ray

        if not ray.is_initialized():
            raise ToolPoolError("ray is not initialized; call ray.init() (or ray.init(address=...)) before ToolPool")
        self.tool = settings.tool
        self.settings = settings
        self._role = role or f"{self.tool}_tools"
        self._worker_kwargs = dict(worker_kwargs or {})
        self._num_cpus = float(num_cpus)
        self._num_gpus = float(num_gpus)
        self._pg = placement_group
        if placement_group is None:
            if bundle_indices is not None:
                raise ToolPoolError("bundle_indices given without a placement_group")
            self._bundles: list[int] | None = None
        else:
            if bundle_indices is None:
                bundles = [-1]  # any bundle of the group
            elif isinstance(bundle_indices, int):
                bundles = [bundle_indices]
            else:
                bundles = [int(b) for b in bundle_indices]
            if not bundles:
                raise ToolPoolError("bundle_indices is empty; give at least one bundle index or None")
            self._bundles = bundles
        self._actor_cls = ray.remote(concurrency_groups={CONTROL_GROUP: 1})(worker_cls)

        # State below is touched only on the pool's loop thread.
        self._slots: dict[int, _Slot] = {}
        self._next_id = 0
        self._target = settings.workers
        self._waiters: deque[asyncio.Future] = deque()
        self._closed = False  # set on the loop thread by _shutdown
        self._closing = False  # set by close() on the caller's thread: no new calls
        self._tasks: set[asyncio.Task] = set()
        self._call_tasks: set[asyncio.Task] = set()
        self._start_failures = 0
        self._last_start_error: str | None = None
        self._spawn_backoff_s = 0.0
        self._retry_scheduled = False
        self._counts = dict(calls=0, errors=0, timeouts=0, retries=0, restarts=0, scale_events=0)
        self._queue_peak = 0
        self._latency = LatencyWindow(settings.latency_window)
        self._queue_wait_sum = 0.0
        self._busy_retired_s = 0.0
        t0 = time.monotonic()
        self._live_clock = WorkerSecondsClock(t0)
        self._last_change = t0
        self._demand = PeakWindow(settings.down_cooldown_s)

        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name=f"ToolPool[{self.tool}]", daemon=True)
        self._thread.start()
        try:
            self._run_sync(self._start(), timeout=None)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(
        cls,
        tool: str | ToolKind,
        tools: Any,
        resources: Any,
        *,
        placement_group: Any = None,
        bundle_indices: int | Sequence[int] | None = None,
        worker_cls: type[ToolWorker] | None = None,
        **settings_overrides: Any,
    ) -> "ToolPool":
        """Pool for `tool` from `cfg.tools` (ToolsConfig) and `cfg.topology.<tool>_tools` (RoleResources).

        `worker_cls` replaces the registered worker class (e.g. a fault-injecting
        subclass); `settings_overrides` set `PoolSettings` fields (timeouts,
        health interval, autoscaling thresholds).
        """
        return cls(**config_kwargs(tool, tools, resources, placement_group=placement_group,
                                   bundle_indices=bundle_indices, worker_cls=worker_cls, **settings_overrides))

    @classmethod
    def remote_from_config(
        cls,
        tool: str | ToolKind,
        tools: Any,
        resources: Any,
        *,
        actor_options: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        """The same pool as a Ray actor, shared by several callers (e.g. all GenerationActors).

        Returns an actor handle: `await handle.call.remote(arg)` gives a `ToolCallResult`;
        `handle.scale.remote(n)`, `handle.metrics.remote()`, `handle.close.remote()` as on the
        class. The manager actor itself takes no CPU (`num_cpus=0`) and serves
        `max_concurrency=10000` callers; `actor_options` overrides both. `kwargs` as `from_config`.
        """
        import ray

        options = {"num_cpus": 0, "max_concurrency": 10_000, "max_restarts": 0, **dict(actor_options or {})}
        return ray.remote(cls).options(**options).remote(**config_kwargs(tool, tools, resources, **kwargs))

    # ------------------------------------------------------------------ public API
    async def call(self, argument: str, *, timeout_s: float | None = None) -> ToolCallResult:
        """Run one call; waits while the pool is full. Never raises for tool failures.

        timeout_s: the call's limit (default `tools.<tool>.call_timeout_s`); the
        worker enforces it, and a worker that has not answered `timeout_grace_s`
        later is killed and replaced, the call answering with an error observation.
        """
        self._check_open()
        fut = asyncio.run_coroutine_threadsafe(self._call(argument, timeout_s), self._loop)
        return await asyncio.wrap_future(fut)

    def call_sync(self, argument: str, *, timeout_s: float | None = None) -> ToolCallResult:
        """Blocking `call` for plain threads (not for use inside a running event loop)."""
        return self._run_sync(self._call(argument, timeout_s), timeout=None)

    async def map_async(self, arguments: Iterable[str], *, timeout_s: float | None = None) -> list[ToolCallResult]:
        """All calls at once (the pool's bound still applies); results in argument order."""
        return list(await asyncio.gather(*(self.call(a, timeout_s=timeout_s) for a in arguments)))

    def map(self, arguments: Iterable[str], *, timeout_s: float | None = None) -> list[ToolCallResult]:
        """Blocking `map_async`."""
        self._check_open()
        futs = [asyncio.run_coroutine_threadsafe(self._call(a, timeout_s), self._loop) for a in arguments]
        return [f.result() for f in futs]

    def scale(self, workers: int, *, wait: bool = True, timeout_s: float | None = None) -> int:
        """Set the worker count at run time; returns the ready-worker count.

        Growing starts new workers; shrinking drains workers (no new calls, their
        in-flight calls finish, then they are stopped). With `wait`, blocks until
        the pool has exactly `workers` ready workers and nothing draining, raising
        `ToolPoolError` after `timeout_s` (default `start_timeout_s`).
        """
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
            raise ToolPoolError(f"scale(workers={workers!r}): expected an int >= 0")
        self._run_sync(self._set_target(workers, reason="scale()"), timeout=None)
        if wait:
            limit = self.settings.start_timeout_s if timeout_s is None else float(timeout_s)
            self._run_sync(self._wait_settled(limit), timeout=None)
        return self._run_sync(self._count("active"), timeout=None)

    def metrics(self) -> dict[str, float]:
        """Snapshot: `{"tools/<tool>/<name>": value}` for every name in `METRIC_NAMES`."""
        return self._run_sync(self._metrics(), timeout=None)

    def worker_handles(self) -> list[Any]:
        """Actor handles of the ready workers (for debugging and fault-injection tests)."""

        async def get() -> list[Any]:
            return [s.handle for s in self._slots.values() if s.state == "active"]

        return self._run_sync(get(), timeout=None)

    def worker_stats(self) -> list[dict[str, Any]]:
        """`stats()` of every ready worker (pid, calls, peak concurrent executions)."""
        import ray

        handles = self.worker_handles()
        return ray.get([h.stats.options(concurrency_group=CONTROL_GROUP).remote() for h in handles])

    def close(self) -> None:
        """Kill the workers; waiting and later calls answer with an error observation. Idempotent."""
        if self._loop.is_closed():
            return
        self._closing = True
        if self._thread.is_alive() and not self._closed:
            try:
                self._run_sync(self._shutdown(), timeout=30)
            except Exception:  # noqa: BLE001 - closing must not raise
                log.exception("tool pool %s: shutdown failed", self.tool)
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> "ToolPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ToolPool(tool={self.tool!r}, target={self._target}, closed={self._closed})"

    # ------------------------------------------------------------------ loop plumbing
    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    def _run_sync(self, coro: Awaitable[T], *, timeout: float | None) -> T:
        if threading.current_thread() is self._thread:
            raise ToolPoolError("blocking ToolPool method called from the pool's own event loop")
        if self._loop.is_closed() or not self._thread.is_alive():
            coro.close()  # type: ignore[attr-defined]
            raise ToolPoolError(f"tool pool {self.tool!r} is closed")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)  # type: ignore[arg-type]

    def _check_open(self) -> None:
        if self._closing or self._loop.is_closed() or not self._thread.is_alive():
            raise ToolPoolError(f"tool pool {self.tool!r} is closed")

    def _background(self, coro: Awaitable[Any]) -> asyncio.Task:
        task = self._loop.create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("tool pool %s: background task failed", self.tool, exc_info=task.exception())

    # ------------------------------------------------------------------ lifecycle
    async def _start(self) -> None:
        for _ in range(self._target):
            self._spawn()
        await self._wait_settled(self.settings.start_timeout_s, fail_fast=True)
        if self.settings.health_interval_s > 0:
            self._background(self._health_loop())
        if self.settings.autoscale:
            self._background(self._autoscale_loop())

    async def _wait_settled(self, limit_s: float, *, fail_fast: bool = False) -> None:
        deadline = time.monotonic() + limit_s
        failures0 = self._start_failures
        while True:
            active = sum(s.state == "active" for s in self._slots.values())
            pending = sum(s.state in ("starting", "draining") for s in self._slots.values())
            if active == self._target and pending == 0:
                return
            if fail_fast and self._start_failures > failures0:
                raise ToolPoolError(self._start_error_message())
            if time.monotonic() > deadline:
                raise ToolPoolError(
                    f"tool pool {self.tool!r}: {active} of {self._target} workers ready and {pending} starting or "
                    f"draining after {limit_s}s. {self._start_error_message()}"
                )
            await asyncio.sleep(0.02)

    def _start_error_message(self) -> str:
        where = ""
        if self._bundles is not None:
            where = f" in placement group bundle(s) {self._bundles}"
        err = f" Last start error: {self._last_start_error}" if self._last_start_error else ""
        return (
            f"{self.tool} tool workers (num_cpus={self._num_cpus:g}, num_gpus={self._num_gpus:g}{where}) could not "
            f"start (limit {self.settings.start_timeout_s}s each); check topology.{self._role}.num_cpus/replicas "
            f"against the cluster's free resources and the tools.{self.tool} config.{err}"
        )

    async def _shutdown(self) -> None:
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        while self._waiters:
            w = self._waiters.popleft()
            if not w.done():
                w.set_exception(_PoolClosed())
        stops = []
        for slot in list(self._slots.values()):
            # Idle workers close their tools (sandbox work dirs, index files) first; busy ones are just killed.
            graceful = slot.state in ("active", "draining") and slot.inflight == 0
            handle = self._remove(slot, kill=False)
            stops.append(self._stop(handle, graceful=graceful))
        self._live_clock.set(0, time.monotonic())
        # Calls still running on the killed workers answer "pool closed" (their callers must not hang).
        calls = [t for t in self._call_tasks if t is not asyncio.current_task()]
        for t in calls:
            t.cancel()
        if calls:
            await asyncio.wait(calls, timeout=5.0)
        await asyncio.gather(*stops)

    # ------------------------------------------------------------------ workers
    def _pick_bundle(self) -> int | None:
        if self._bundles is None:
            return None
        load = {b: 0 for b in self._bundles}
        for s in self._slots.values():
            if s.bundle in load and s.state != "dead":
                load[s.bundle] += 1
        return min(self._bundles, key=lambda b: (load[b], self._bundles.index(b)))  # type: ignore[union-attr]

    def _spawn(self) -> _Slot:
        slot = _Slot(id=self._next_id, bundle=self._pick_bundle())
        self._next_id += 1
        options: dict[str, Any] = dict(
            num_cpus=self._num_cpus,
            num_gpus=self._num_gpus,
            max_concurrency=self.settings.max_inflight_per_worker,
            max_restarts=0,
            max_task_retries=0,
        )
        if self._pg is not None:
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                placement_group=self._pg,
                placement_group_bundle_index=slot.bundle,
                placement_group_capture_child_tasks=False,
            )
        try:
            slot.handle = self._actor_cls.options(**options).remote(**self._worker_kwargs)
        except Exception as exc:  # noqa: BLE001 - e.g. the placement group was removed
            self._start_failed(f"creating the actor failed: {_short_error(exc)}", slot)
            return slot
        self._slots[slot.id] = slot
        self._background(self._await_ready(slot))
        return slot

    def _start_failed(self, reason: str, slot: _Slot) -> None:
        """Count a failed start and try again later, with exponential backoff (0.5 s .. 30 s)."""
        self._start_failures += 1
        self._last_start_error = reason
        log.warning("tool pool %s: worker %d failed to start: %s", self.tool, slot.id, reason)
        self._spawn_backoff_s = min(30.0, max(0.5, 2 * self._spawn_backoff_s))
        if not self._retry_scheduled:  # one pending retry at a time, however many starts failed
            self._retry_scheduled = True
            self._background(self._reconcile_later(self._spawn_backoff_s))

    async def _await_ready(self, slot: _Slot) -> None:
        try:
            ref = slot.handle.ready.options(concurrency_group=CONTROL_GROUP).remote()
            info = await asyncio.wait_for(asyncio.wrap_future(ref.future()), self.settings.start_timeout_s)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - any start failure: kill, count, try again later
            if slot.state == "dead":  # drained or closed while starting: not a failure
                return
            self._remove(slot, kill=True)
            self._start_failed(_short_error(exc) if not isinstance(exc, asyncio.TimeoutError) else
                               f"ready() not answered within {self.settings.start_timeout_s}s (not schedulable?)",
                               slot)
            return
        self._spawn_backoff_s = 0.0
        slot.pid = info.get("pid") if isinstance(info, dict) else None
        if slot.state == "starting":
            slot.state = "active"
            self._update_live_clock()
            self._dispatch()

    async def _reconcile_later(self, delay_s: float) -> None:
        try:
            await asyncio.sleep(delay_s)
        finally:
            self._retry_scheduled = False
        self._reconcile()

    def _reconcile(self) -> None:
        """Start or drain workers until starting + active == target."""
        if self._closed:
            return
        live = [s for s in self._slots.values() if s.state in ("starting", "active")]
        for _ in range(self._target - len(live)):
            self._spawn()
        excess = len(live) - self._target
        if excess > 0:
            # Drain starting workers first, then the least loaded active ones (newest first on ties).
            order = sorted(live, key=lambda s: (s.state != "starting", s.inflight, -s.id))
            for slot in order[:excess]:
                self._drain(slot)

    def _drain(self, slot: _Slot) -> None:
        if slot.state == "starting":  # nothing to finish: cancel its creation (it may never be schedulable)
            self._remove(slot, kill=True)
            return
        slot.state = "draining"
        if slot.inflight == 0:
            self._remove(slot, kill=True, graceful=True)
        # Otherwise it is removed when its last in-flight call returns (`_release`).

    def _remove(self, slot: _Slot, *, kill: bool, graceful: bool = False) -> Any:
        """Forget `slot`; with `kill`, stop its actor in the background (after `close()` if graceful)."""
        if slot.state == "dead" and slot.id not in self._slots:
            return None
        now = time.monotonic()
        slot.busy.stop(now)
        self._busy_retired_s += slot.busy.busy_s(now)
        slot.busy = BusyClock()
        slot.state = "dead"
        self._slots.pop(slot.id, None)
        self._update_live_clock()
        if kill and slot.handle is not None:
            if graceful:
                self._background(self._stop(slot.handle, graceful=True))
            else:
                _kill(slot.handle)
        return slot.handle

    async def _stop(self, handle: Any, *, graceful: bool) -> None:
        if handle is None:
            return
        try:
            if graceful:
                ref = handle.close.options(concurrency_group=CONTROL_GROUP).remote()
                await asyncio.wait_for(asyncio.wrap_future(ref.future()), 5.0)
        except Exception:  # noqa: BLE001 - killed below either way
            pass
        finally:  # also when cancelled by shutdown
            _kill(handle)

    def _retire(self, slot: _Slot, reason: str) -> None:
        """A worker died, hung or failed its health check: kill it and start a replacement."""
        if slot.state == "dead":
            return
        was_draining = slot.state == "draining"
        log.warning("tool pool %s: replacing worker %d (pid %s): %s", self.tool, slot.id, slot.pid, reason)
        self._remove(slot, kill=True)
        if not was_draining:
            self._counts["restarts"] += 1
        self._reconcile()

    def _update_live_clock(self) -> None:
        n = sum(s.state in ("active", "draining") for s in self._slots.values())
        self._live_clock.set(n, time.monotonic())

    async def _set_target(self, workers: int, *, reason: str) -> None:
        if self._closed:
            raise ToolPoolError(f"tool pool {self.tool!r} is closed")
        if workers != self._target:
            log.info("tool pool %s: %d -> %d workers (%s)", self.tool, self._target, workers, reason)
            self._counts["scale_events"] += 1
            self._last_change = time.monotonic()
        self._target = workers
        self._reconcile()
        if workers == 0 and not self.settings.autoscale:
            while self._waiters:  # nobody will ever serve them
                w = self._waiters.popleft()
                if not w.done():
                    w.set_exception(_NoWorkers())

    async def _count(self, state: str) -> int:
        return sum(s.state == state for s in self._slots.values())

    # ------------------------------------------------------------------ slots (back-pressure)
    def _free_slot(self) -> _Slot | None:
        best = None
        cap = self.settings.max_inflight_per_worker
        for s in self._slots.values():
            if s.state == "active" and s.inflight < cap and (best is None or s.inflight < best.inflight):
                best = s
        return best

    def _take(self, slot: _Slot) -> _Slot:
        slot.inflight += 1
        if slot.inflight == 1:
            slot.busy.start(time.monotonic())
        return slot

    def _release(self, slot: _Slot) -> None:
        if slot.state == "dead":
            return
        slot.inflight -= 1
        assert slot.inflight >= 0, "released a slot twice"
        if slot.inflight == 0:
            slot.busy.stop(time.monotonic())
            if slot.state == "draining":
                self._remove(slot, kill=True, graceful=True)
        self._dispatch()

    def _dispatch(self) -> None:
        while self._waiters:
            slot = self._free_slot()
            if slot is None:
                return
            w = self._waiters.popleft()
            if w.done():  # its caller gave up
                continue
            w.set_result(self._take(slot))

    async def _acquire(self) -> _Slot:
        if self._closed:
            raise _PoolClosed()
        if not self._waiters:
            slot = self._free_slot()
            if slot is not None:
                return self._take(slot)
        if self._target == 0 and not self.settings.autoscale:
            raise _NoWorkers()
        fut: asyncio.Future = self._loop.create_future()
        self._waiters.append(fut)
        self._queue_peak = max(self._queue_peak, self._queue_depth())
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self._release(fut.result())  # handed a slot just as the caller went away
            else:
                try:
                    self._waiters.remove(fut)
                except ValueError:
                    pass
            raise

    def _queue_depth(self) -> int:
        return len(self._waiters)  # a waiter leaves the deque when served, cancelled or failed

    # ------------------------------------------------------------------ one call
    async def _call(self, argument: str, timeout_s: float | None) -> ToolCallResult:
        task = asyncio.current_task()
        assert task is not None
        self._call_tasks.add(task)
        t_submit = time.monotonic()
        try:
            return await self._call_inner(argument, timeout_s, t_submit)
        except asyncio.CancelledError:
            if not self._closed:
                raise  # the caller went away
            result = self._error_result(argument, f"{self.tool} tool pool is closed", 1)
            result.latency_s = time.monotonic() - t_submit
            self._record(result)
            return result
        finally:
            self._call_tasks.discard(task)

    async def _call_inner(self, argument: str, timeout_s: float | None, t_submit: float) -> ToolCallResult:
        if not isinstance(argument, str):
            raise ToolPoolError(f"tool {self.tool!r}: argument must be a str, got {type(argument).__name__}")
        limit = self.settings.call_timeout_s if timeout_s is None else float(timeout_s)
        if not limit > 0:
            raise ToolPoolError(f"tool {self.tool!r}: timeout_s={timeout_s!r}; expected > 0 or None")
        queue_wait = 0.0
        attempts = 0
        result: ToolCallResult | None = None
        while result is None:
            attempts += 1
            t_q = time.monotonic()
            try:
                slot = await self._acquire()
            except _PoolClosed:
                result = self._error_result(argument, f"{self.tool} tool pool is closed", attempts)
                break
            except _NoWorkers:
                result = self._error_result(argument, f"{self.tool} tool pool has no workers (scaled to 0)", attempts)
                break
            queue_wait += time.monotonic() - t_q
            outcome, payload = await self._execute(slot, argument, limit)
            if outcome == "ok":
                reply: WorkerReply = payload
                result = ToolCallResult(
                    tool=self.tool, argument=argument, observation=reply.observation, error=reply.error,
                    attempts=attempts, timed_out=reply.timed_out, worker_id=slot.id,
                )
            elif outcome == "timeout":
                result = self._error_result(argument, timeout_reason(limit), attempts, timed_out=True,
                                            worker_id=slot.id)
            elif outcome == "died" and attempts < 2:
                self._counts["retries"] += 1
            elif outcome == "died":
                result = self._error_result(
                    argument, f"{self.tool} worker died during the call, twice ({payload})", attempts,
                    worker_id=slot.id,
                )
            else:  # the worker raised: a bug or bad input, the worker itself is fine
                result = self._error_result(argument, f"{self.tool} worker raised {payload}", attempts,
                                            worker_id=slot.id)
        result.latency_s = time.monotonic() - t_submit
        result.queue_wait_s = queue_wait
        self._record(result)
        return result

    def _error_result(self, argument: str, reason: str, attempts: int, *, timed_out: bool = False,
                      worker_id: int | None = None) -> ToolCallResult:
        return ToolCallResult(tool=self.tool, argument=argument, observation=error_observation(reason),
                              error=reason, attempts=attempts, timed_out=timed_out, worker_id=worker_id)

    async def _execute(self, slot: _Slot, argument: str, limit_s: float) -> tuple[str, Any]:
        """Run on `slot`, which the caller holds. Returns (outcome, payload); releases or retires the slot."""
        from ray.exceptions import RayActorError, RayError, RayTaskError

        ref = slot.handle.execute.remote(argument, limit_s)
        fut = asyncio.wrap_future(ref.future())
        fut.add_done_callback(_retrieve)  # outcomes nobody awaits any more (timed out) are not logged as lost
        try:
            reply = await asyncio.wait_for(asyncio.shield(fut), limit_s + self.settings.timeout_grace_s)
        except asyncio.TimeoutError:
            self._retire(slot, f"no answer within {limit_s}s + {self.settings.timeout_grace_s}s grace")
            return "timeout", None
        except asyncio.CancelledError:
            # The caller went away; keep the slot until the worker answers so the bound holds.
            if not self._closed:
                self._background(self._release_when_done(slot, fut, limit_s))
            raise
        except RayActorError as exc:
            self._retire(slot, f"actor died: {_short_error(exc)}")
            return "died", _short_error(exc)
        except RayTaskError as exc:
            self._release(slot)
            return "raised", _short_error(exc)
        except RayError as exc:  # object lost, worker OOM-killed, ...: treat like a dead worker
            self._retire(slot, f"ray error: {_short_error(exc)}")
            return "died", _short_error(exc)
        except Exception as exc:  # noqa: BLE001 - e.g. the reply could not be deserialized
            self._release(slot)
            return "raised", _short_error(exc)
        self._release(slot)
        if not isinstance(reply, WorkerReply):
            return "raised", f"TypeError: execute() returned {type(reply).__name__}, expected WorkerReply"
        return "ok", reply

    async def _release_when_done(self, slot: _Slot, fut: asyncio.Future, limit_s: float) -> None:
        try:
            await asyncio.wait_for(fut, limit_s + self.settings.timeout_grace_s)
        except asyncio.TimeoutError:
            self._retire(slot, "abandoned call never answered")
            return
        except Exception:  # noqa: BLE001 - the call's outcome no longer matters
            pass
        if slot.state != "dead":
            self._release(slot)

    def _record(self, result: ToolCallResult) -> None:
        c = self._counts
        c["calls"] += 1
        if result.error is not None:
            c["errors"] += 1
        if result.timed_out:
            c["timeouts"] += 1
        self._latency.add(result.latency_s)
        self._queue_wait_sum += result.queue_wait_s

    # ------------------------------------------------------------------ background loops
    async def _health_loop(self) -> None:
        while not self._closed:
            await asyncio.sleep(self.settings.health_interval_s)
            for slot in list(self._slots.values()):
                if slot.state in ("active", "draining") and not slot.checking:
                    slot.checking = True
                    self._background(self._check(slot))

    async def _check(self, slot: _Slot) -> None:
        try:
            ref = slot.handle.ready.options(concurrency_group=CONTROL_GROUP).remote()
            await asyncio.wait_for(asyncio.wrap_future(ref.future()), self.settings.health_timeout_s)
        except asyncio.CancelledError:
            raise
        except asyncio.TimeoutError:
            self._retire(slot, f"health check: ready() not answered within {self.settings.health_timeout_s}s")
        except Exception as exc:  # noqa: BLE001
            self._retire(slot, f"health check failed: {_short_error(exc)}")
        finally:
            slot.checking = False

    async def _autoscale_loop(self) -> None:
        policy = self.settings.autoscale_policy()
        while not self._closed:
            await asyncio.sleep(self.settings.autoscale_interval_s)
            now = time.monotonic()
            inflight = sum(s.inflight for s in self._slots.values() if s.state in ("active", "draining"))
            depth = self._queue_depth()
            self._demand.add(now, inflight + depth)
            target = autoscale_target(
                workers=self._target,
                queue_depth=depth,
                inflight=inflight,
                peak_demand=self._demand.peak(),
                since_last_change_s=now - self._last_change,
                policy=policy,
            )
            if target != self._target:
                await self._set_target(target, reason=f"autoscale: queue={depth} inflight={inflight}")

    # ------------------------------------------------------------------ metrics
    async def _metrics(self) -> dict[str, float]:
        now = time.monotonic()
        states = [s.state for s in self._slots.values()]
        active = states.count("active")
        lat = self._latency.summary()
        busy = self._busy_retired_s + sum(s.busy.busy_s(now) for s in self._slots.values())
        c = self._counts
        values: dict[str, float] = {
            "calls": c["calls"],
            "errors": c["errors"],
            "timeouts": c["timeouts"],
            "retries": c["retries"],
            "restarts": c["restarts"],
            "queue_depth": self._queue_depth(),
            "queue_depth_peak": self._queue_peak,
            "inflight": sum(s.inflight for s in self._slots.values()),
            "capacity": active * self.settings.max_inflight_per_worker,
            "workers": active,
            "workers_starting": states.count("starting"),
            "workers_draining": states.count("draining"),
            "target_workers": self._target,
            "scale_events": c["scale_events"],
            "latency_mean": lat["mean"],
            "latency_p50": lat["p50"],
            "latency_p95": lat["p95"],
            "latency_p99": lat["p99"],
            "queue_wait_mean": self._queue_wait_sum / c["calls"] if c["calls"] else 0.0,
            "busy_fraction": busy_fraction(busy, self._live_clock.total(now)),
        }
        assert set(values) == set(METRIC_NAMES), "metric names drifted from pool_core.METRIC_NAMES"
        return {metric_key(self.tool, k): float(v) for k, v in values.items()}


def _kill(handle: Any) -> None:
    import ray

    try:
        ray.kill(handle, no_restart=True)
    except Exception:  # noqa: BLE001 - already gone
        pass


def _retrieve(fut: asyncio.Future) -> None:
    if not fut.cancelled():
        fut.exception()


def _short_error(exc: BaseException, limit: int = 300) -> str:
    """`TypeName: message` in one bounded line (Ray error messages run to pages of traceback)."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):  # RayTaskError: the exception raised inside the worker
        exc = cause
    lines = [ln.strip() for ln in _ANSI.sub("", str(exc)).splitlines() if ln.strip()]
    if getattr(exc, "actor_init_failed", False) and lines:
        msg = f"worker __init__ failed: {lines[-1]}"  # the last traceback line names the real error
    else:
        msg = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."
