"""Tool pools: pure policy and statistics (no Ray), then real pools on a local Ray (num_cpus=2).

Integration tests use the real `PythonSandbox` and a real BM25 index. The only
fake is `FaultInjectingPythonWorker`: the real python worker, except that three
magic arguments inject a fault (hang, process exit, process exit once).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tepo_ray.config import ConfigError, PythonToolConfig, RoleResources, SearchToolConfig, ToolsConfig
from tepo_ray.records import ToolCall
from tepo_ray.tools.pool_core import (
    METRIC_NAMES,
    AutoscalePolicy,
    BusyClock,
    LatencyWindow,
    PeakWindow,
    PoolSettings,
    ToolCallResult,
    WorkerSecondsClock,
    autoscale_target,
    busy_fraction,
    error_observation,
    metric_key,
    percentile,
    timeout_reason,
)

# =========================================================================== pure (no Ray)


def test_percentile_worked_example():
    v = [1.0, 2.0, 3.0, 4.0]
    # position (n-1) q / 100: q=50 -> 1.5 -> 2.5; q=95 -> 2.85 -> 3 + 0.85 * (4 - 3)
    assert percentile(v, 50) == pytest.approx(2.5)
    assert percentile(v, 95) == pytest.approx(3.85)
    assert percentile(v, 0) == 1.0 and percentile(v, 100) == 4.0
    assert percentile([], 50) == 0.0
    assert percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError, match="outside"):
        percentile(v, 101)


@given(st.lists(st.floats(0, 1e3, allow_nan=False), min_size=1, max_size=50), st.floats(0, 100))
@settings(max_examples=60, deadline=None)
def test_percentile_matches_numpy(values, q):
    np = pytest.importorskip("numpy")
    assert percentile(sorted(values), q) == pytest.approx(float(np.percentile(values, q)), abs=1e-9)


def test_latency_window_keeps_only_recent_calls():
    w = LatencyWindow(maxlen=3)
    for x in (100.0, 1.0, 2.0, 3.0):  # 100.0 falls out of the window
        w.add(x)
    s = w.summary()
    assert len(w) == 3
    assert s["mean"] == pytest.approx(2.0)
    assert s["p50"] == pytest.approx(2.0)
    assert s["p99"] == pytest.approx(2.98)


def test_busy_fraction_worked_example():
    # Two workers alive 0..10 s, a third joins at 4 s: 2*4 + 3*6 = 26 worker-seconds.
    live = WorkerSecondsClock(0.0, count=2)
    live.set(3, 4.0)
    assert live.total(10.0) == pytest.approx(26.0)
    # Worker A busy 1..3 and 5..(open at 10); B busy 2..6.
    a, b = BusyClock(), BusyClock()
    a.start(1.0), a.stop(3.0), a.start(5.0)
    a.start(6.0)  # already running: no effect
    b.start(2.0), b.stop(6.0), b.stop(7.0)  # stopping twice: no effect
    busy = a.busy_s(10.0) + b.busy_s(10.0)
    assert busy == pytest.approx(2 + 5 + 4)
    assert busy_fraction(busy, live.total(10.0)) == pytest.approx(11 / 26)
    assert busy_fraction(5.0, 0.0) == 0.0
    assert busy_fraction(30.0, 26.0) == 1.0


def test_peak_window_forgets_old_samples():
    w = PeakWindow(window_s=10.0)
    w.add(0.0, 9.0)
    w.add(5.0, 2.0)
    assert w.peak() == 9.0
    w.add(10.5, 1.0)  # the sample at t=0 is now older than 10 s
    assert w.peak() == 2.0


POLICY = AutoscalePolicy(min_workers=1, max_workers=4, max_inflight_per_worker=2, target_utilization=0.75,
                         down_cooldown_s=10.0, max_step_down=1)


@pytest.mark.parametrize(
    "workers, queue, inflight, peak, since, expected, why",
    [
        (1, 5, 2, 7, 0.0, 4, "demand 7 at 2 per worker needs ceil(7/2)=4, up at once"),
        (2, 1, 4, 5, 0.0, 3, "demand 5 needs 3"),
        (2, 20, 4, 24, 0.0, 4, "clamped to max_workers"),
        (4, 1, 8, 9, 0.0, 4, "at max already"),
        (3, 0, 1, 1, 5.0, 3, "inside the down cooldown: no change"),
        (3, 0, 1, 1, 12.0, 2, "needs ceil(1/(2*0.75))=1 but steps down one at a time"),
        (2, 0, 0, 3, 12.0, 2, "peak demand 3 over the window needs ceil(3/1.5)=2"),
        (1, 0, 0, 0, 60.0, 1, "never below min_workers"),
        (0, 0, 0, 0, 0.0, 1, "below min_workers: back to min"),
        (6, 0, 0, 0, 0.0, 4, "above max_workers: back to max"),
    ],
)
def test_autoscale_target_worked_table(workers, queue, inflight, peak, since, expected, why):
    got = autoscale_target(workers=workers, queue_depth=queue, inflight=inflight, peak_demand=peak,
                           since_last_change_s=since, policy=POLICY)
    assert got == expected, why


def test_autoscale_from_zero_workers():
    policy = AutoscalePolicy(min_workers=0, max_workers=3, max_inflight_per_worker=4)
    assert autoscale_target(workers=0, queue_depth=1, inflight=0, peak_demand=1, since_last_change_s=0,
                            policy=policy) == 1
    assert autoscale_target(workers=1, queue_depth=0, inflight=0, peak_demand=0, since_last_change_s=60,
                            policy=policy) == 0


@given(
    lo=st.integers(0, 4), span=st.integers(0, 8), cap=st.integers(1, 8), workers=st.integers(0, 16),
    queue=st.integers(0, 100), inflight=st.integers(0, 100), extra_peak=st.integers(0, 50),
    since=st.floats(0, 100),
)
@settings(max_examples=300, deadline=None)
def test_autoscale_invariants(lo, span, cap, workers, queue, inflight, extra_peak, since):
    hi = max(1, lo) + span
    policy = AutoscalePolicy(min_workers=lo, max_workers=hi, max_inflight_per_worker=cap, down_cooldown_s=10)
    got = autoscale_target(workers=workers, queue_depth=queue, inflight=inflight,
                           peak_demand=inflight + queue + extra_peak, since_last_change_s=since, policy=policy)
    assert lo <= got <= hi
    if lo <= workers <= hi:
        if queue > 0:
            assert got >= workers  # never shrink while callers wait
        if got > workers:
            assert queue > 0  # only queued callers trigger growth
            assert (got - 1) * cap < inflight + queue  # and no more workers than the demand needs
        if got < workers:
            assert workers - got <= policy.max_step_down


def test_pool_settings_errors_name_the_config_key():
    with pytest.raises(ConfigError, match=r"tools\.python\.workers=-1"):
        PoolSettings(tool="python", workers=-1)
    with pytest.raises(ConfigError, match=r"tools\.search\.workers=9 .*within \[tools\.search\.min_workers"):
        PoolSettings(tool="search", workers=9, min_workers=1, max_workers=4, autoscale=True)
    with pytest.raises(ConfigError, match=r"tools\.max_inflight_per_worker=0"):
        PoolSettings(tool="python", workers=1, max_inflight_per_worker=0)
    with pytest.raises(ConfigError, match="unknown PoolSettings field"):
        PoolSettings.from_tool_config(PythonToolConfig(), tool="python", max_inflight_per_worker=2, health_s=1)
    s = PoolSettings.from_tool_config(PythonToolConfig(workers=3, call_timeout_s=2.5), tool="python",
                                      max_inflight_per_worker=2, health_interval_s=0.5)
    assert (s.workers, s.call_timeout_s, s.max_inflight_per_worker, s.health_interval_s) == (3, 2.5, 2, 0.5)


def test_result_becomes_a_tool_call_record():
    r = ToolCallResult(tool="python", argument="print(1)", observation=error_observation(timeout_reason(5)),
                       error=timeout_reason(5), latency_s=5.2, timed_out=True)
    assert r.observation == "error: tool call timed out after 5.0s"
    call = r.to_tool_call(segment_index=3)
    assert isinstance(call, ToolCall)
    assert ToolCall.from_dict(json.loads(json.dumps(call.to_dict()))) == call
    assert (call.tool, call.error, call.latency_s, call.segment_index) == ("python", r.error, 5.2, 3)


def test_metric_keys_are_stable_strings():
    assert metric_key("python", "latency_p95") == "tools/python/latency_p95"
    for name in ("calls", "errors", "timeouts", "retries", "restarts", "queue_depth", "workers", "latency_p50",
                 "latency_p95", "latency_p99", "busy_fraction"):
        assert name in METRIC_NAMES
    with pytest.raises(KeyError, match="unknown tool-pool metric"):
        metric_key("python", "latency_p90")


def test_pool_core_does_not_import_ray():
    """pool_core is pure: importing it must not import Ray."""
    import subprocess

    code = "import sys, tepo_ray.tools.pool_core; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# =========================================================================== real pools on local Ray
ray = pytest.importorskip("ray")

from actors.tool_pool import PythonToolWorker, ToolPool, ToolPoolError  # noqa: E402

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this module by name

FAULT = "#fault:"  # a python comment: harmless if it ever reached a real sandbox


class FaultInjectingPythonWorker(PythonToolWorker):
    """The real python worker; only three magic arguments inject a fault instead of running code.

    '#fault:hang'             sleeps far past any timeout (a stuck tool)
    '#fault:exit'             the worker process dies (os._exit), every time
    '#fault:exit-once:<path>' dies unless <path> exists, creating it first: the retry succeeds
    """

    def _run(self, argument: str, timeout_s: float):
        if argument == FAULT + "hang":
            time.sleep(3600)
        if argument == FAULT + "exit":
            os._exit(17)
        if argument.startswith(FAULT + "exit-once:"):
            marker = Path(argument.split(":", 2)[2])
            if not marker.exists():
                marker.write_text("crashed once")
                os._exit(17)
            argument = "print('survived')"
        return super()._run(argument, timeout_s)


def _tools(**python) -> ToolsConfig:
    python.setdefault("workers", 1)
    python.setdefault("prestarted", 1)
    inflight = python.pop("max_inflight_per_worker", 2)
    return ToolsConfig(python=PythonToolConfig(**python), max_inflight_per_worker=inflight)


SMALL = RoleResources(num_cpus=0.25)


def _m(pool: ToolPool) -> dict[str, float]:
    return {k.split("/", 2)[2]: v for k, v in pool.metrics().items()}


def _wait_for(pred, *, timeout_s: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


@pytest.fixture(scope="module")
def python_pool(ray_local):
    pool = ToolPool.from_config("python", _tools(workers=2, max_workers=4), SMALL, health_interval_s=0)
    yield pool
    pool.close()


@pytest.fixture(scope="module")
def fault_pool(ray_local):
    """One worker, one call in flight, fast health checks."""
    pool = ToolPool.from_config("python", _tools(workers=1, max_inflight_per_worker=1), SMALL,
                                worker_cls=FaultInjectingPythonWorker, health_interval_s=0.5,
                                health_timeout_s=5.0, timeout_grace_s=0.5)
    yield pool
    pool.close()


@pytest.mark.ray
def test_python_calls_return_observations_and_metrics_count_them(python_pool):
    before = _m(python_pool)
    ks = [10, 1000, 12345, 77]
    results = python_pool.map([f"print(sum(i * i for i in range({k})))" for k in ks])
    for k, r in zip(ks, results):
        assert r.error is None, r
        assert str(sum(i * i for i in range(k))) in r.observation
        assert r.latency_s > 0 and r.attempts == 1
    bad = python_pool.call_sync("print(1 / 0)")
    assert "ZeroDivisionError" in bad.observation

    async def two():
        return await asyncio.gather(python_pool.call("print(6 * 7)"), python_pool.call("print('x' * 3)"))

    a, b = asyncio.run(two())
    assert "42" in a.observation and "xxx" in b.observation
    after = _m(python_pool)
    assert after["calls"] - before["calls"] == len(ks) + 3
    assert after["errors"] - before["errors"] == sum(r.error is not None for r in results + [bad, a, b])
    assert after["timeouts"] == before["timeouts"] and after["restarts"] == before["restarts"]
    assert after["workers"] == 2 and after["queue_depth"] == 0 and after["inflight"] == 0
    assert 0 < after["latency_p50"] <= after["latency_p95"] <= after["latency_p99"]
    assert 0 < after["busy_fraction"] <= 1
    call = a.to_tool_call(segment_index=0)
    assert call.tool == "python" and call.argument == "print(6 * 7)" and call.latency_s == a.latency_s


@pytest.mark.ray
def test_sandbox_timeout_is_an_error_observation_without_killing_the_worker(python_pool):
    before = _m(python_pool)
    r = python_pool.call_sync("import time\ntime.sleep(30)", timeout_s=1.0)
    assert r.error is not None and r.timed_out
    assert r.latency_s < 30
    after = _m(python_pool)
    assert after["timeouts"] - before["timeouts"] == 1
    assert after["restarts"] == before["restarts"]  # the sandbox enforced it; the worker is healthy
    assert "3" in python_pool.call_sync("print(1 + 2)").observation


@pytest.mark.ray
def test_scale_up_and_down_at_run_time(python_pool):
    assert python_pool.scale(3) == 3
    pids = {s["pid"] for s in python_pool.worker_stats()}
    assert len(pids) == 3 and _m(python_pool)["workers"] == 3
    results = python_pool.map([f"print({i} * 2)" for i in range(9)])
    assert [r.observation.strip() for r in results] == [str(i * 2) for i in range(9)]

    # Shrink while calls run: the draining workers finish their calls (graceful), none is lost.
    async def shrink_under_load():
        calls = [asyncio.ensure_future(python_pool.call(f"import time\ntime.sleep(0.5)\nprint('slow{i}')"))
                 for i in range(6)]
        await asyncio.sleep(0.2)
        n = await asyncio.to_thread(python_pool.scale, 1)
        return n, await asyncio.gather(*calls)

    before = _m(python_pool)
    n, slow = asyncio.run(shrink_under_load())
    assert n == 1
    assert [r.observation.strip() for r in slow] == [f"slow{i}" for i in range(6)]
    assert all(r.attempts == 1 for r in slow)
    after = _m(python_pool)
    assert after["workers"] == 1 and after["workers_draining"] == 0 and len(python_pool.worker_handles()) == 1
    assert after["restarts"] == before["restarts"] and after["errors"] == before["errors"]
    assert python_pool.worker_stats()[0]["pid"] in pids
    assert "ok" in python_pool.call_sync("print('ok')").observation
    assert python_pool.scale(2) == 2
    with pytest.raises(ToolPoolError, match="expected an int >= 0"):
        python_pool.scale(-1)


@pytest.mark.ray
def test_back_pressure_bounds_concurrency_on_the_worker(fault_pool):
    async def burst():
        return await asyncio.gather(*(fault_pool.call(f"import time\ntime.sleep(0.1)\nprint({i})")
                                      for i in range(10)))

    before = _m(fault_pool)
    results = asyncio.run(burst())
    assert [r.observation.strip() for r in results] == [str(i) for i in range(10)]
    (stats,) = fault_pool.worker_stats()
    assert stats["peak_active"] == 1  # max_inflight_per_worker=1 with 1 worker
    after = _m(fault_pool)
    assert after["calls"] - before["calls"] == 10
    assert after["queue_depth_peak"] >= 9  # all 10 arrived before the first finished: 9 waited
    assert after["queue_depth"] == 0 and after["inflight"] == 0
    assert sum(r.queue_wait_s > 0.05 for r in results) >= 8


@pytest.mark.ray
def test_more_inflight_runs_calls_concurrently_up_to_the_bound(python_pool):
    """2 workers x max_inflight 2: a burst of 12 reaches but never exceeds 2 at once per worker."""
    python_pool.scale(2)

    async def burst():
        return await asyncio.gather(*(python_pool.call(f"import time\ntime.sleep(0.3)\nprint({i})")
                                      for i in range(12)))

    results = asyncio.run(burst())
    assert all(r.error is None for r in results)
    peaks = [s["peak_active"] for s in python_pool.worker_stats()]
    assert max(peaks) == 2, peaks


@pytest.mark.ray
def test_killed_worker_mid_call_is_replaced_and_the_call_retried(fault_pool):
    before = _m(fault_pool)
    (old,) = fault_pool.worker_handles()

    async def kill_mid_call():
        call = asyncio.ensure_future(fault_pool.call("import time\ntime.sleep(1.0)\nprint('finished')",
                                                     timeout_s=20))
        await asyncio.to_thread(_wait_for, lambda: fault_pool.worker_stats()[0]["active"] == 1,
                                what="the call to start")
        ray.kill(old)
        return await call

    r = asyncio.run(kill_mid_call())
    assert r.error is None and "finished" in r.observation
    assert r.attempts == 2
    after = _m(fault_pool)
    assert after["retries"] - before["retries"] == 1
    assert after["restarts"] - before["restarts"] == 1
    assert after["workers"] == 1 and fault_pool.worker_handles() != [old]


@pytest.mark.ray
def test_worker_exiting_mid_call_retried_once_then_succeeds(fault_pool, tmp_path):
    before = _m(fault_pool)
    r = fault_pool.call_sync(f"{FAULT}exit-once:{tmp_path / 'crashed'}", timeout_s=20)
    assert (tmp_path / "crashed").exists()  # the first attempt really died
    assert r.error is None and "survived" in r.observation and r.attempts == 2
    after = _m(fault_pool)
    assert (after["retries"] - before["retries"], after["restarts"] - before["restarts"]) == (1, 1)


@pytest.mark.ray
def test_worker_dying_twice_gives_an_error_observation(fault_pool):
    before = _m(fault_pool)
    r = fault_pool.call_sync(FAULT + "exit", timeout_s=20)
    assert r.error is not None and r.observation.startswith("error: ") and "died" in r.observation
    assert r.attempts == 2
    after = _m(fault_pool)
    assert after["restarts"] - before["restarts"] == 2
    assert after["errors"] - before["errors"] == 1 and after["calls"] - before["calls"] == 1
    ok = fault_pool.call_sync("print('alive')", timeout_s=20)
    assert ok.error is None and "alive" in ok.observation


@pytest.mark.ray
def test_hanging_call_hits_the_pool_timeout_and_the_pool_recovers(fault_pool):
    before = _m(fault_pool)
    t0 = time.monotonic()
    r = fault_pool.call_sync(FAULT + "hang", timeout_s=1.0)
    assert time.monotonic() - t0 < 10
    assert r.observation == "error: tool call timed out after 1.0s" and r.timed_out
    ok = fault_pool.call_sync("print('after the hang')", timeout_s=20)
    assert ok.error is None and "after the hang" in ok.observation
    after = _m(fault_pool)
    assert after["timeouts"] - before["timeouts"] == 1
    assert after["restarts"] - before["restarts"] == 1  # the stuck worker was killed and replaced
    assert after["calls"] - before["calls"] == 2 and after["errors"] - before["errors"] == 1


@pytest.mark.ray
def test_health_check_replaces_a_worker_that_died_while_idle(fault_pool):
    before = _m(fault_pool)
    (old,) = fault_pool.worker_handles()
    old_pid = fault_pool.worker_stats()[0]["pid"]
    ray.kill(old)
    _wait_for(lambda: _m(fault_pool)["restarts"] > before["restarts"] and _m(fault_pool)["workers"] == 1,
              what="the health check to replace the killed worker")
    assert fault_pool.worker_stats()[0]["pid"] != old_pid
    assert _m(fault_pool)["calls"] == before["calls"]  # found without any call failing
    assert "7" in fault_pool.call_sync("print(7)", timeout_s=20).observation


@pytest.mark.ray
def test_autoscaling_follows_queue_depth(ray_local):
    tools = _tools(workers=1, min_workers=1, max_workers=2, autoscale=True, max_inflight_per_worker=1)
    with ToolPool.from_config("python", tools, SMALL, health_interval_s=0, autoscale_interval_s=0.1,
                              down_cooldown_s=1.0) as pool:
        async def burst():
            return await asyncio.gather(*(pool.call(f"import time\ntime.sleep(0.4)\nprint({i})") for i in range(8)))

        results = asyncio.run(burst())
        assert [r.observation.strip() for r in results] == [str(i) for i in range(8)]
        assert len({r.worker_id for r in results}) == 2  # the queue brought up a second worker that served calls
        assert _m(pool)["scale_events"] >= 1
        # Idle for longer than the cooldown: back down to min_workers, gracefully.
        _wait_for(lambda: (lambda m: m["target_workers"] == 1 and m["workers"] == 1
                           and m["workers_draining"] == 0)(_m(pool)), what="scale-down to min_workers")
        m = _m(pool)
        assert m["restarts"] == 0 and m["errors"] == 0 and m["scale_events"] >= 2
        assert "ok" in pool.call_sync("print('ok')").observation


@pytest.mark.ray
def test_pool_placed_in_a_placement_group_bundle(ray_local):
    from ray.util.placement_group import placement_group, remove_placement_group

    pg = placement_group([{"CPU": 0.5}], strategy="PACK")
    ray.get(pg.ready(), timeout=30)
    try:
        with ToolPool.from_config("python", _tools(workers=2, max_workers=4), SMALL, placement_group=pg,
                                  bundle_indices=[0], health_interval_s=0, start_timeout_s=30) as pool:
            infos = ray.get([h.ready.remote() for h in pool.worker_handles()])
            assert {i["placement_group"] for i in infos} == {pg.id.hex()}
            assert "5" in pool.call_sync("print(2 + 3)").observation
            # A third 0.25-CPU worker does not fit the 0.5-CPU bundle: scale() says so instead of hanging.
            with pytest.raises(ToolPoolError, match=r"topology\.python_tools\.num_cpus"):
                pool.scale(3, timeout_s=2.0)
            assert pool.scale(2) == 2
            assert "ok" in pool.call_sync("print('ok')").observation
    finally:
        remove_placement_group(pg)


@pytest.fixture(scope="module")
def bm25_index(tmp_path_factory):
    from tepo_ray.data.corpus import generate_corpus, write_corpus
    from tepo_ray.tools.retrieval import build_index

    root = tmp_path_factory.mktemp("search")
    docs = generate_corpus(num_docs=60, seed=3)
    write_corpus(root / "corpus.jsonl", docs)
    build_index(root / "corpus.jsonl", root / "index", backend="bm25")
    return docs, root / "index"


@pytest.mark.ray
def test_search_pool_answers_from_a_real_bm25_index(ray_local, bm25_index):
    from tepo_ray.data.corpus import parse_contents

    docs, index_dir = bm25_index
    tools = ToolsConfig(search=SearchToolConfig(workers=1, index_dir=str(index_dir), top_k=2, max_doc_chars=120),
                        max_observation_chars=400)
    with ToolPool.from_config("search", tools, SMALL, health_interval_s=0) as pool:
        titles = [parse_contents(d["contents"])[0] for d in docs[:5]]
        results = pool.map(titles)
        for title, r in zip(titles, results):
            assert r.error is None, r
            assert r.observation.startswith("Doc 1(Title: ")
            assert f'(Title: "{title}")' in r.observation
            assert len(r.observation) <= 400
        m = _m(pool)
        assert m["calls"] == 5 and m["errors"] == 0 and m["workers"] == 1
        assert set(pool.metrics()) == {f"tools/search/{n}" for n in METRIC_NAMES}


@pytest.mark.ray
def test_search_pool_without_an_index_fails_naming_the_key(ray_local):
    with pytest.raises(ConfigError, match=r"tools\.search\.index_dir is null"):
        ToolPool.from_config("search", ToolsConfig(), SMALL, health_interval_s=0)


@pytest.mark.ray
def test_worker_that_cannot_start_fails_the_pool_with_its_error(ray_local, tmp_path):
    tools = ToolsConfig(search=SearchToolConfig(index_dir=str(tmp_path / "no-index-here")))
    with pytest.raises(ToolPoolError, match=r"could not start.*worker __init__ failed: .*no-index-here"):
        ToolPool.from_config("search", tools, SMALL, health_interval_s=0, start_timeout_s=30)


@pytest.mark.ray
def test_closed_pool_answers_with_an_error_observation(ray_local):
    pool = ToolPool.from_config("python", _tools(workers=1), SMALL, health_interval_s=0)

    async def wait_then_close():
        # Fill the only worker, queue one more, close: the queued caller gets an error observation.
        busy = [asyncio.ensure_future(pool.call("import time\ntime.sleep(0.5)")) for _ in range(2)]
        queued = asyncio.ensure_future(pool.call("print('never')"))
        await asyncio.sleep(0.2)
        await asyncio.to_thread(pool.close)
        return await queued, await asyncio.gather(*busy)

    queued, _ = asyncio.run(wait_then_close())
    assert queued.error is not None and "closed" in queued.observation
    with pytest.raises(ToolPoolError, match="closed"):
        pool.call_sync("print(1)")
    pool.close()  # idempotent


@pytest.mark.ray
def test_pool_as_a_shared_ray_actor_serves_several_callers(ray_local):
    handle = ToolPool.remote_from_config("python", _tools(workers=1), SMALL, health_interval_s=0)

    @ray.remote(num_cpus=0)
    def rollout(pool, i: int) -> list[str]:
        async def turns():
            return await asyncio.gather(*(pool.call.remote(f"print({i} * 100 + {k})") for k in range(3)))

        return [r.observation.strip() for r in asyncio.run(turns())]

    try:
        got = ray.get([rollout.remote(handle, i) for i in range(3)], timeout=120)
        assert got == [[str(i * 100 + k) for k in range(3)] for i in range(3)]
        m = ray.get(handle.metrics.remote())
        assert m["tools/python/calls"] == 9 and m["tools/python/errors"] == 0
    finally:
        ray.get(handle.close.remote())
        ray.kill(handle)


@pytest.mark.ray
def test_unknown_tool_lists_the_valid_ones(ray_local):
    with pytest.raises(ConfigError, match=r"unknown tool 'calculator'; expected one of \['python', 'search'\]"):
        ToolPool.from_config("calculator", ToolsConfig(), SMALL)
