"""Pure logic of the tool-execution pools (no Ray import; `actors/tool_pool.py` is the plumbing).

What lives here, each testable by hand:

* result types crossing the pool boundary: `WorkerReply` (worker -> pool) and
  `ToolCallResult` (pool -> caller), which converts into `tepo_ray.records.ToolCall`;
* error observations (`error_observation`, `timeout_reason`): a failed call is an
  observation the model reads, never an exception that ends the trajectory;
* metric names (`METRIC_NAMES`, `metric_key`): stable strings `tools/<tool>/<name>`;
* latency statistics (`percentile`, `LatencyWindow`) and busy-time accounting
  (`BusyClock`, `WorkerSecondsClock`, `busy_fraction`);
* pool settings (`PoolSettings`, checked like the config schemas) and the
  queue-depth autoscaling policy (`AutoscalePolicy`, `autoscale_target`, `PeakWindow`).
"""

from __future__ import annotations

import enum
import math
from collections import deque
from dataclasses import dataclass, fields
from typing import Any, Mapping, Sequence

from tepo_ray.config import ConfigError
from tepo_ray.records import ToolCall

__all__ = [
    "ToolKind",
    "METRIC_NAMES",
    "metric_key",
    "WorkerReply",
    "ToolCallResult",
    "error_observation",
    "timeout_reason",
    "percentile",
    "LatencyWindow",
    "BusyClock",
    "WorkerSecondsClock",
    "busy_fraction",
    "PeakWindow",
    "AutoscalePolicy",
    "autoscale_target",
    "PoolSettings",
]


class ToolKind(str, enum.Enum):
    """Built-in tool names (the tag the model writes: `<python>`, `<search>`)."""

    PYTHON = "python"
    SEARCH = "search"


# --------------------------------------------------------------------------- metrics
# Suffixes of the per-pool metric keys; the full key is `tools/<tool>/<name>`.
METRIC_NAMES: tuple[str, ...] = (
    "calls",  # calls answered (a retried call counts once)
    "errors",  # answered calls whose result carries an error: the tool's (python "exception", "timeout",
    #            "memory", ...) and the pool's (worker died twice, pool timeout, pool closed)
    "timeouts",  # calls that timed out (sandbox limit or pool deadline)
    "retries",  # calls re-sent after their worker died
    "restarts",  # workers replaced after dying, hanging or failing a health check
    "queue_depth",  # callers waiting for a free slot now
    "queue_depth_peak",  # most callers ever waiting at once
    "inflight",  # calls executing on workers now
    "capacity",  # ready workers x max in-flight calls per worker
    "workers",  # ready workers taking calls (draining and starting ones excluded)
    "workers_starting",
    "workers_draining",
    "target_workers",  # what scale()/the autoscaler asked for
    "scale_events",  # target changes (manual and automatic)
    "latency_mean",  # end-to-end seconds per call (queue wait included), recent window
    "latency_p50",
    "latency_p95",
    "latency_p99",
    "queue_wait_mean",
    "busy_fraction",  # worker-seconds with >= 1 call executing / worker-seconds alive
)


def metric_key(tool: str, name: str) -> str:
    """`metric_key("python", "latency_p95") -> "tools/python/latency_p95"`."""
    if name not in METRIC_NAMES:
        raise KeyError(f"unknown tool-pool metric {name!r}; expected one of {list(METRIC_NAMES)}")
    return f"tools/{tool}/{name}"


# --------------------------------------------------------------------------- results
@dataclass
class WorkerReply:
    """What a worker returns for one call (crosses the actor boundary)."""

    observation: str
    error: str | None = None  # None on success; short reason otherwise
    duration_s: float = 0.0  # execution time inside the worker
    timed_out: bool = False  # the tool's own limit (e.g. the sandbox wall clock) was hit


@dataclass
class ToolCallResult:
    """What `ToolPool.call` returns; never raised, always an observation the model can read."""

    tool: str
    argument: str
    observation: str
    error: str | None = None
    latency_s: float = 0.0  # submit -> result, queue wait and retries included
    queue_wait_s: float = 0.0
    attempts: int = 1  # 2 when the first worker died and the call was retried
    timed_out: bool = False
    worker_id: int | None = None  # pool-local id of the worker that answered

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_tool_call(self, *, segment_index: int = 0) -> ToolCall:
        """The trajectory record of this call (`tepo_ray.records.ToolCall`)."""
        return ToolCall(
            tool=self.tool,
            argument=self.argument,
            observation=self.observation,
            error=self.error,
            latency_s=self.latency_s,
            segment_index=segment_index,
        )


def error_observation(reason: str) -> str:
    """Observation text for a failed call: `"error: <reason>"`."""
    return f"error: {reason}"


def timeout_reason(timeout_s: float) -> str:
    """`timeout_reason(5) -> "tool call timed out after 5.0s"`."""
    return f"tool call timed out after {float(timeout_s)}s"


# --------------------------------------------------------------------------- latency
def percentile(sorted_values: Sequence[float], q: float) -> float:
    """q-th percentile (q in [0, 100]) of ascending values, linear interpolation.

    Same as `numpy.percentile(values, q)` (method "linear"): position
    p = (n - 1) q / 100, value = v[floor p] + (p - floor p)(v[ceil p] - v[floor p]).
    Empty input gives 0.0.
    """
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q={q!r} outside [0, 100]")
    n = len(sorted_values)
    if n == 0:
        return 0.0
    pos = (n - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, n - 1)
    frac = pos - lo
    return float(sorted_values[lo] + frac * (sorted_values[hi] - sorted_values[lo]))


class LatencyWindow:
    """The last `maxlen` latencies; quantiles over that window."""

    def __init__(self, maxlen: int = 4096) -> None:
        if maxlen < 1:
            raise ValueError(f"LatencyWindow maxlen={maxlen!r}; expected >= 1")
        self._values: deque[float] = deque(maxlen=maxlen)

    def add(self, seconds: float) -> None:
        self._values.append(float(seconds))

    def __len__(self) -> int:
        return len(self._values)

    def summary(self) -> dict[str, float]:
        """{"mean", "p50", "p95", "p99"} in seconds (0.0 when empty)."""
        vals = sorted(self._values)
        mean = sum(vals) / len(vals) if vals else 0.0
        return {
            "mean": mean,
            "p50": percentile(vals, 50),
            "p95": percentile(vals, 95),
            "p99": percentile(vals, 99),
        }


class BusyClock:
    """Seconds one worker spent with at least one call executing.

    `start(now)` when its in-flight count goes 0 -> 1, `stop(now)` when it goes
    back to 0; `busy_s(now)` includes the interval still open.
    """

    def __init__(self) -> None:
        self._total = 0.0
        self._since: float | None = None

    @property
    def running(self) -> bool:
        return self._since is not None

    def start(self, now: float) -> None:
        if self._since is None:
            self._since = now

    def stop(self, now: float) -> None:
        if self._since is not None:
            self._total += max(0.0, now - self._since)
            self._since = None

    def busy_s(self, now: float) -> float:
        open_s = max(0.0, now - self._since) if self._since is not None else 0.0
        return self._total + open_s


class WorkerSecondsClock:
    """Integral of the live worker count over time: sum_i n_i * (t_{i+1} - t_i)."""

    def __init__(self, now: float, count: int = 0) -> None:
        self._t = now
        self._n = count
        self._total = 0.0

    def set(self, count: int, now: float) -> None:
        self._total += self._n * max(0.0, now - self._t)
        self._t = now
        self._n = count

    def total(self, now: float) -> float:
        return self._total + self._n * max(0.0, now - self._t)


def busy_fraction(busy_s: float, worker_s: float) -> float:
    """busy worker-seconds / live worker-seconds, in [0, 1] (0.0 before any worker lived)."""
    if worker_s <= 0.0:
        return 0.0
    return min(1.0, max(0.0, busy_s / worker_s))


# --------------------------------------------------------------------------- autoscaling
class PeakWindow:
    """Maximum of a signal over the last `window_s` seconds (samples added with `add`)."""

    def __init__(self, window_s: float) -> None:
        if window_s < 0:
            raise ValueError(f"PeakWindow window_s={window_s!r}; expected >= 0")
        self.window_s = float(window_s)
        self._samples: deque[tuple[float, float]] = deque()

    def add(self, now: float, value: float) -> None:
        self._samples.append((now, float(value)))
        while self._samples and self._samples[0][0] < now - self.window_s:
            self._samples.popleft()

    def peak(self) -> float:
        return max((v for _, v in self._samples), default=0.0)


@dataclass(frozen=True)
class AutoscalePolicy:
    """Queue-depth autoscaling between `min_workers` and `max_workers`.

    Up: when `queue_depth >= up_queue_threshold`, go straight to the workers the
    current demand needs at full load, ceil((inflight + queue) / max_inflight).
    Down: only after `down_cooldown_s` without a change, and only to the workers
    the peak demand of that window needs at `target_utilization`, at most
    `max_step_down` workers at a time (draining is graceful, but a smaller step
    keeps a burst from finding the pool half gone).
    """

    min_workers: int
    max_workers: int
    max_inflight_per_worker: int
    up_queue_threshold: int = 1
    target_utilization: float = 0.75
    down_cooldown_s: float = 10.0
    max_step_down: int = 1

    def __post_init__(self) -> None:
        if self.min_workers < 0:
            raise ValueError(f"AutoscalePolicy.min_workers={self.min_workers!r}; expected >= 0")
        if self.max_workers < max(1, self.min_workers):
            raise ValueError(
                f"AutoscalePolicy.max_workers={self.max_workers!r}; expected >= max(1, min_workers={self.min_workers})"
            )
        if self.max_inflight_per_worker < 1:
            raise ValueError(
                f"AutoscalePolicy.max_inflight_per_worker={self.max_inflight_per_worker!r}; expected >= 1"
            )
        if self.up_queue_threshold < 1:
            raise ValueError(f"AutoscalePolicy.up_queue_threshold={self.up_queue_threshold!r}; expected >= 1")
        if not 0.0 < self.target_utilization <= 1.0:
            raise ValueError(f"AutoscalePolicy.target_utilization={self.target_utilization!r}; expected in (0, 1]")
        if self.down_cooldown_s < 0:
            raise ValueError(f"AutoscalePolicy.down_cooldown_s={self.down_cooldown_s!r}; expected >= 0")
        if self.max_step_down < 1:
            raise ValueError(f"AutoscalePolicy.max_step_down={self.max_step_down!r}; expected >= 1")


def autoscale_target(
    *,
    workers: int,
    queue_depth: int,
    inflight: int,
    peak_demand: float,
    since_last_change_s: float,
    policy: AutoscalePolicy,
) -> int:
    """Worker count the pool should move to (== `workers` for "no change").

    workers: current target (ready + starting, draining excluded);
    queue_depth: callers waiting; inflight: calls executing;
    peak_demand: max of (inflight + queue_depth) over the last `policy.down_cooldown_s`;
    since_last_change_s: seconds since the worker target last changed.
    """
    lo, hi, cap = policy.min_workers, policy.max_workers, policy.max_inflight_per_worker
    if workers < lo:
        return lo
    if workers > hi:
        return hi
    demand = inflight + queue_depth
    if queue_depth >= policy.up_queue_threshold:
        need = math.ceil(demand / cap)
        return min(hi, max(workers, need))
    if queue_depth > 0 or since_last_change_s < policy.down_cooldown_s:
        return workers
    need = math.ceil(max(peak_demand, demand) / (cap * policy.target_utilization))
    if need < workers:
        return max(lo, need, workers - policy.max_step_down)
    return workers


# --------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class PoolSettings:
    """Everything a `ToolPool` needs besides the worker class and placement.

    Built from `tools.<tool>` and `tools.max_inflight_per_worker` with
    `PoolSettings.from_tool_config`; the operational knobs below the first block
    have defaults that suit both tools.
    """

    tool: str
    workers: int
    min_workers: int = 1
    max_workers: int = 4
    autoscale: bool = False
    call_timeout_s: float = 5.0  # default per-call limit; the worker gets it, the pool waits + grace
    max_inflight_per_worker: int = 4
    timeout_grace_s: float = 2.0  # extra wait so a tool's own (clean) timeout wins over a kill
    health_interval_s: float = 5.0  # 0 disables periodic health checks
    health_timeout_s: float = 5.0
    start_timeout_s: float = 60.0  # a worker not ready by then is killed and started again
    autoscale_interval_s: float = 0.5
    up_queue_threshold: int = 1
    target_utilization: float = 0.75
    down_cooldown_s: float = 10.0
    max_step_down: int = 1
    latency_window: int = 4096

    def __post_init__(self) -> None:
        t = self.tool
        _check(self.workers >= 0, f"tools.{t}.workers", self.workers, ">= 0")
        _check(self.min_workers >= 0, f"tools.{t}.min_workers", self.min_workers, ">= 0")
        _check(self.max_workers >= max(1, self.min_workers), f"tools.{t}.max_workers", self.max_workers,
               f">= tools.{t}.min_workers ({self.min_workers}) and >= 1")
        if self.autoscale:
            _check(self.min_workers <= self.workers <= self.max_workers, f"tools.{t}.workers", self.workers,
                   f"within [tools.{t}.min_workers, tools.{t}.max_workers] = [{self.min_workers}, "
                   f"{self.max_workers}] when tools.{t}.autoscale=true")
        _check(self.call_timeout_s > 0, f"tools.{t}.call_timeout_s", self.call_timeout_s, "> 0")
        _check(self.max_inflight_per_worker >= 1, "tools.max_inflight_per_worker", self.max_inflight_per_worker, ">= 1")
        _check(self.timeout_grace_s >= 0, "timeout_grace_s", self.timeout_grace_s, ">= 0")
        _check(self.health_interval_s >= 0, "health_interval_s", self.health_interval_s, ">= 0 (0 disables)")
        _check(self.health_timeout_s > 0, "health_timeout_s", self.health_timeout_s, "> 0")
        _check(self.start_timeout_s > 0, "start_timeout_s", self.start_timeout_s, "> 0")
        _check(self.autoscale_interval_s > 0, "autoscale_interval_s", self.autoscale_interval_s, "> 0")
        _check(self.latency_window >= 1, "latency_window", self.latency_window, ">= 1")
        self.autoscale_policy()  # validates the autoscaling fields

    def autoscale_policy(self) -> AutoscalePolicy:
        return AutoscalePolicy(
            min_workers=self.min_workers,
            max_workers=self.max_workers,
            max_inflight_per_worker=self.max_inflight_per_worker,
            up_queue_threshold=self.up_queue_threshold,
            target_utilization=self.target_utilization,
            down_cooldown_s=self.down_cooldown_s,
            max_step_down=self.max_step_down,
        )

    @classmethod
    def from_tool_config(
        cls, tool_cfg: Any, *, tool: str, max_inflight_per_worker: int, **overrides: Any
    ) -> "PoolSettings":
        """From `tools.python` / `tools.search` (dataclass or DictConfig) plus keyword overrides."""
        base = {
            name: _get(tool_cfg, name, tool)
            for name in ("workers", "min_workers", "max_workers", "autoscale", "call_timeout_s")
        }
        base["max_inflight_per_worker"] = max_inflight_per_worker
        known = {f.name for f in fields(cls)} - {"tool"}
        unknown = set(overrides) - known
        if unknown:
            raise ConfigError(f"unknown PoolSettings field(s) {sorted(unknown)}; expected some of {sorted(known)}")
        base.update(overrides)
        return cls(tool=tool, **base)


def _get(cfg: Any, name: str, tool: str) -> Any:
    try:
        return cfg[name] if isinstance(cfg, Mapping) else getattr(cfg, name)
    except (KeyError, AttributeError):
        raise ConfigError(f"tools.{tool}.{name} is missing from the tool config {type(cfg).__name__}") from None


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid; expected {allowed}")
