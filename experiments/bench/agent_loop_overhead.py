"""Agent-loop throughput vs the raw engine, on the tiny SFT-warm-started model, `hf` and `vllm`.

    python -m experiments.bench.agent_loop_overhead [--engines hf,vllm --tools pool,local --groups 32 --repeats 5]

The loop is the real one: `AgentLoop` + `EngineBatcher` (tepo_ray.rollout) running
`--groups` groups of `--group-size` trajectories (arithmetic prompts of the train
split) concurrently; the SFT warm start makes them call `<python>`. The tools are
real too, in one of two variants (`--tools`):

* **pool**: the production path. `PoolToolRouter` (actors.generation) -> a
  `ToolPool` manager actor -> `PythonToolWorker` actors, each with its own
  `PythonSandbox`, as a GenerationActor calls them in a run. Ray (so every pool
  process) runs on the cores after the first; the measured process (engine, event
  loop, Ray client threads) is pinned to the first core ("pinned"): a generator
  and a tool pool with their own CPU bundles.
* **local**: `CallableToolRouter` over a `PythonSandbox` in this process, each call
  on a dedicated thread pool (`--tool-threads`). "pinned": this process on the
  first core, the sandbox fork servers and their snippets on the others;
  "shared": everything on every core (tool processes compete with the engine).

The engine is wrapped by `CallRecorder`, which forwards every `generate` call
unchanged and records its requests and start/end times. After two warm-up
rounds per variant, each repeat runs one loop round and then, back to back, its
raw baselines on the same engine:

* **loop**: generated tokens / wall time, with tool time *excluded*: the wall time
  during which at least one tool call is running and no engine call is (the engine
  idles only because every rollout waits on a tool) is subtracted, since the raw
  engine has no tools. The plain wall-time figure (tool wait counted) is printed too.
* **raw (same calls)**: `engine.generate` re-run on exactly the requests the loop
  sent (same prompt ids, same `max_tokens`, same stop ids and sampling), batched as
  the loop batched them. loop / this is the primary ratio: what the loop costs
  beyond generating the same requests (asyncio batching, parsing, token
  bookkeeping, tool routing, and the tool client's work in the engine's process).
* **raw (turn-batched)**: the same requests, the k-th turn of every trajectory in
  one call: also charges the loop for splitting turns into smaller batches when
  tool results come back at different times.
* **raw (single-shot)**: each trajectory's *first* prompt, `max_tokens` = the tokens
  it generated over all its turns, one call, no stop tags (EOS still stops): also
  charges multi-turn itself (re-prefill of context and observation each turn,
  waiting for the longest row of each turn). A bound, not a loop cost.
* **engine calls inside the loop**: tokens / time spent inside `engine.generate`
  during the loop round; ÷ raw (same calls) shows how much the same calls are
  slowed by what runs beside them in the loop (event loop, tool client threads).

Ratios are the median over repeats of each repeat's loop ÷ raw; the issue's target
is >= 0.9. The engine runs with `--threads` torch threads (default 1, a 1-CPU
generation actor).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import os
import statistics
import time
from typing import Any, Sequence

from experiments.bench.tiny_model import DEMO, TINY


class CallRecorder:
    """Forwards to a real engine; records each `generate` call's requests, outputs and (start, end)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.calls: list[dict[str, Any]] = []

    @property
    def version(self) -> int:
        return self.engine.version

    def generate(self, requests: Sequence[Any], **kw: Any) -> list[Any]:
        t0 = time.perf_counter()
        outs = self.engine.generate(requests, **kw)
        t1 = time.perf_counter()
        self.calls.append({"t0": t0, "t1": t1, "requests": list(requests), "tokens": [len(o.token_ids) for o in outs]})
        return outs


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _length(intervals: list[tuple[float, float]]) -> float:
    return sum(b - a for a, b in intervals)


def _minus(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """Length of union(a) minus union(b): time covered by a and not by b."""
    ua, ub = _union(a), _union(b)
    total = _length(ua)
    for x0, x1 in ua:
        for y0, y1 in ub:
            lo, hi = max(x0, y0), min(x1, y1)
            if hi > lo:
                total -= hi - lo
    return total


def _pin_process(cpus: set[int]) -> None:
    """Every thread of this process onto `cpus` (sched_setaffinity is per thread)."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except (ProcessLookupError, PermissionError):
            pass


class TimedRouter:
    """Forwards to a real ToolRouter; records each call's (start, end)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.intervals: list[tuple[float, float]] = []

    async def call(self, tool: str, argument: str) -> Any:
        t0 = time.perf_counter()
        try:
            return await self.inner.call(tool, argument)
        finally:
            self.intervals.append((t0, time.perf_counter()))


class LocalSandboxTools:
    """`python` over a PythonSandbox in this process (CallableToolRouter), calls on a dedicated thread pool.

    Pinned: this process's threads (engine, event loop, tool client threads) on the first core, the
    sandbox fork servers and the snippets they fork on the others. Shared: everything on every core.
    """

    label = "local sandbox (CallableToolRouter, in-process client threads)"

    def __init__(self, cfg: Any, *, threads: int) -> None:
        from tepo_ray.rollout import CallableToolRouter
        from tepo_ray.tools.python_sandbox import PythonSandbox, format_observation

        tools_cfg = cfg.tools
        self.sandbox = PythonSandbox.from_config(tools_cfg.python)
        self._format = format_observation
        self._max_chars = int(tools_cfg.python.max_output_chars)
        self._obs_chars = int(tools_cfg.max_observation_chars)
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="tool")
        self.router = TimedRouter(CallableToolRouter({"python": self._python}))
        self.cpus = sorted(os.sched_getaffinity(0))
        self.modes = ["pinned", "shared"] if len(self.cpus) >= 2 else ["shared"]

    async def _python(self, code: str) -> Any:
        from tepo_ray.rollout import ToolOutcome

        t0 = time.perf_counter()
        res = await asyncio.get_running_loop().run_in_executor(self.pool, self.sandbox.run, code)
        error = None if res.error is None else str(getattr(res.error, "value", res.error))
        return ToolOutcome(self._format(res, max_chars=self._max_chars)[: self._obs_chars], error,
                           time.perf_counter() - t0)

    def set_mode(self, mode: str) -> None:
        engine, tools = ({self.cpus[0]}, set(self.cpus[1:])) if mode == "pinned" else (set(self.cpus),) * 2
        _pin_process(engine)
        for pid in self.sandbox.worker_pids():
            try:
                os.sched_setaffinity(pid, tools)
            except (ProcessLookupError, PermissionError):
                pass

    def close(self) -> None:
        _pin_process(set(self.cpus))
        self.pool.shutdown(wait=True)
        self.sandbox.close()


class RayPoolTools:
    """`python` over the real tool pool (ToolPool manager actor + PythonToolWorker actors) via PoolToolRouter,
    as a GenerationActor calls it. Ray (and so every pool process) is started on the cores after the first;
    pinned mode puts this process (engine, event loop, Ray client threads) on the first core."""

    label = "Ray tool pool (PoolToolRouter -> ToolPool actor -> PythonToolWorker actors)"

    def __init__(self, cfg: Any) -> None:
        from types import SimpleNamespace

        import ray
        from omegaconf import OmegaConf

        from actors.generation import PoolToolRouter
        from actors.tool_pool import ToolPool

        self.cpus = sorted(os.sched_getaffinity(0))
        if len(self.cpus) < 2:
            raise RuntimeError("the Ray tool pool variant needs >= 2 cores (engine on one, tools on the rest)")
        self.modes = ["pinned"]
        self._started_ray = not ray.is_initialized()
        if self._started_ray:
            _pin_process(set(self.cpus[1:]))  # children (raylet, workers) inherit it
            ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, object_store_memory=256 * 1024**2,
                     _system_config={"worker_niceness": 0}, log_to_driver=False)
            _pin_process(set(self.cpus))
        tools = OmegaConf.to_object(cfg.tools)
        self.handle = ToolPool.remote_from_config("python", tools, SimpleNamespace(num_cpus=0.25, num_gpus=0.0))
        ray.get(self.handle.metrics.remote())  # the pool and its workers are up
        self.router = TimedRouter(PoolToolRouter({"python": self.handle},
                                                 max_observation_chars=int(cfg.tools.max_observation_chars)))

    def set_mode(self, mode: str) -> None:
        _pin_process({self.cpus[0]} if mode == "pinned" else set(self.cpus))

    def close(self) -> None:
        import ray

        _pin_process(set(self.cpus))
        try:
            ray.get(self.handle.close.remote(), timeout=30)
        except Exception:
            pass
        if self._started_ray:
            ray.shutdown()


def run_loop(*, engine: Any, tokenizer: Any, cfg: Any, router: TimedRouter, items: list[dict[str, Any]],
             group_size: int, sampling: dict[str, Any], tag: str) -> dict[str, Any]:
    """One round of `len(items)` concurrent groups through the real agent loop."""
    from tepo_ray.rollout import AgentLoop, EngineBatcher

    rec = CallRecorder(engine)
    batcher = EngineBatcher(rec, sampling=sampling)
    loop = AgentLoop(batcher=batcher, tokenizer=tokenizer, tools=router, engine_cfg=cfg.engine,
                     max_observation_chars=cfg.tools.max_observation_chars, eos_token_id=tokenizer.eos_token_id)
    router.intervals.clear()

    async def go() -> tuple[list[Any], float, float]:
        t0 = time.perf_counter()
        groups = await asyncio.gather(*[loop.rollout_group(it, group_id=f"{tag}-{i}", group_size=group_size)
                                        for i, it in enumerate(items)])
        return [t for g in groups for t in g], t0, time.perf_counter()

    trajs, t0, t1 = asyncio.run(go())
    wall = t1 - t0
    engine_iv = [(c["t0"], c["t1"]) for c in rec.calls]
    tokens = sum(t.num_generated for t in trajs)
    if tokens != batcher.tokens:
        raise RuntimeError(f"trajectories hold {tokens} generated tokens but the engine returned {batcher.tokens}")
    return {
        "trajs": trajs, "calls": rec.calls, "wall": wall, "tokens": tokens, "engine_s": _length(_union(engine_iv)),
        "tool_only_s": _minus(list(router.intervals), engine_iv), "tool_calls": sum(t.num_calls for t in trajs),
        "tool_errors": sum(1 for t in trajs for c in t.tool_calls if c.error),
        "finish": {r: sum(1 for t in trajs if t.finish_reason == r) for r in sorted({t.finish_reason for t in trajs})},
    }


def _timed_generate(engine: Any, requests: list[Any], sampling: dict[str, Any]) -> tuple[float, int]:
    t0 = time.perf_counter()
    outs = engine.generate(requests, **sampling)
    return time.perf_counter() - t0, sum(len(o.token_ids) for o in outs)


def raw_same_calls(engine: Any, calls: list[dict[str, Any]], sampling: dict[str, Any]) -> float:
    dt = n = 0
    for c in calls:
        d, k = _timed_generate(engine, c["requests"], sampling)
        dt += d
        n += k
    return n / dt


def raw_turn_batched(engine: Any, calls: list[dict[str, Any]], sampling: dict[str, Any]) -> float:
    """The loop's requests regrouped by turn index (the k-th request of each trajectory in call k)."""
    by_turn: dict[int, list[Any]] = {}
    seen: dict[str, int] = {}
    for c in calls:
        for r in c["requests"]:
            k = seen.get(r.request_id, 0)
            seen[r.request_id] = k + 1
            by_turn.setdefault(k, []).append(r)
    dt = n = 0
    for k in sorted(by_turn):
        d, m = _timed_generate(engine, by_turn[k], sampling)
        dt += d
        n += m
    return n / dt


def raw_single_shot(engine: Any, trajs: list[Any], sampling: dict[str, Any]) -> float:
    from tepo_ray.engines import GenerationRequest

    reqs = [GenerationRequest(list(t.token_ids[: t.prompt_len]), max(1, t.num_generated), t.uid) for t in trajs]
    d, n = _timed_generate(engine, reqs, {**sampling, "stop_token_ids": []})
    return n / d


def bench_engine(name: str, *, cfg: Any, model_path: str, items: list[dict[str, Any]], group_size: int,
                 repeats: int, tool_kinds: list[str], tool_threads: int) -> list[dict[str, Any]]:
    """For each tool variant and core mode: `repeats` loop rounds, each followed by its raw baselines."""
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer

    from tepo_ray.agent import stop_token_ids
    from tepo_ray.engines import make_engine

    n_traj = len(items) * group_size
    ecfg = OmegaConf.merge(cfg.engine, {"name": name, "max_num_seqs": max(int(cfg.engine.max_num_seqs), n_traj)})
    cfg = OmegaConf.merge(cfg, {"engine": ecfg})
    tok = AutoTokenizer.from_pretrained(model_path)
    stops = stop_token_ids(tok) + ([tok.eos_token_id] if tok.eos_token_id is not None else [])
    sampling = dict(temperature=float(cfg.engine.temperature), top_p=float(cfg.engine.top_p), stop_token_ids=stops)
    t0 = time.perf_counter()
    engine = make_engine(cfg.engine, model_path=model_path)
    print(f"\n[{name}] engine init {time.perf_counter() - t0:.1f}s", flush=True)
    out = []
    try:
        for kind in tool_kinds:
            tools = LocalSandboxTools(cfg, threads=tool_threads) if kind == "local" else RayPoolTools(cfg)
            rows: dict[str, list[dict[str, Any]]] = {m: [] for m in tools.modes}
            try:
                for mode in tools.modes:
                    tools.set_mode(mode)
                    for _ in range(2):  # warm-up: engine, raw paths, enough sandbox servers for the peak
                        warm = run_loop(engine=engine, tokenizer=tok, cfg=cfg, router=tools.router, items=items,
                                        group_size=group_size, sampling=sampling, tag="warm")
                    tools.set_mode(mode)  # servers started during warm-up get the mode's cores too
                    raw_same_calls(engine, warm["calls"], sampling)
                    raw_single_shot(engine, warm["trajs"], sampling)
                for r in range(repeats):
                    for mode in tools.modes:
                        tools.set_mode(mode)
                        res = run_loop(engine=engine, tokenizer=tok, cfg=cfg, router=tools.router, items=items,
                                       group_size=group_size, sampling=sampling, tag=f"{kind}-{mode}{r}")
                        rows[mode].append({
                            "loop_wall_tps": res["tokens"] / res["wall"],
                            "loop_tps": res["tokens"] / (res["wall"] - res["tool_only_s"]),
                            "engine_in_loop_tps": res["tokens"] / res["engine_s"],
                            "raw_same_tps": raw_same_calls(engine, res["calls"], sampling),
                            "raw_turn_tps": raw_turn_batched(engine, res["calls"], sampling),
                            "raw_single_tps": raw_single_shot(engine, res["trajs"], sampling),
                            **{k: res[k] for k in ("wall", "tokens", "engine_s", "tool_only_s", "tool_calls",
                                                   "tool_errors", "finish")},
                            "overhead_s": res["wall"] - res["engine_s"] - res["tool_only_s"],
                            "engine_calls": len(res["calls"]),
                            "mean_batch": statistics.fmean(len(c["requests"]) for c in res["calls"]),
                        })
            finally:
                tools.close()
            for mode, rs in rows.items():
                out.append({"engine": name, "tools": tools.label, "kind": kind, "mode": mode, "rows": rs})
    finally:
        engine.shutdown()
    return out


def _report(res: dict[str, Any]) -> dict[str, float]:
    rows = res["rows"]
    m = {k: statistics.median(r[k] for r in rows) for k in rows[0] if isinstance(rows[0][k], (int, float))}
    where = ("engine process on 1 core, tool processes on the other(s)" if res["mode"] == "pinned"
             else "engine and tool processes share all cores")
    print(f"\n[{res['engine']} | tools: {res['tools']} | {res['mode']}: {where}]")
    print(f"  per round (median of {len(rows)}): {m['tokens']:.0f} tokens, {m['tool_calls']:.0f} tool calls "
          f"({m['tool_errors']:.0f} errors), {m['engine_calls']:.0f} engine calls (mean batch {m['mean_batch']:.1f}); "
          f"finish {rows[-1]['finish']}")
    print(f"  loop wall {m['wall']:.3f}s = engine {m['engine_s']:.3f}s + tool-only wait {m['tool_only_s']:.3f}s "
          f"+ loop overhead {m['overhead_s']:.3f}s (medians)")
    print(f"  {'tokens/s':<38} {'median':>9}   per repeat")
    for key, label in (("loop_tps", "loop (tool wait excluded)"), ("loop_wall_tps", "loop (tool wait counted)"),
                       ("engine_in_loop_tps", "engine calls inside the loop"),
                       ("raw_same_tps", "raw, same calls"), ("raw_turn_tps", "raw, turn-batched"),
                       ("raw_single_tps", "raw, single-shot (multi-turn-free)")):
        print(f"  {label:<38} {m[key]:>9.1f}   {[round(r[key], 1) for r in rows]}")
    pairs = {"loop/raw_same": ("loop_tps", "raw_same_tps"), "loop/raw_turn": ("loop_tps", "raw_turn_tps"),
             "loop/raw_single": ("loop_tps", "raw_single_tps"),
             "loop_with_tools/raw_same": ("loop_wall_tps", "raw_same_tps"),
             "engine_in_loop/raw_same": ("engine_in_loop_tps", "raw_same_tps")}
    # median over repeats of each repeat's ratio (the loop round and its raw baselines run back to back)
    ratios = {k: statistics.median(r[a] / r[b] for r in rows) for k, (a, b) in pairs.items()}
    print(f"  ratio loop / raw (same calls)        = {ratios['loop/raw_same']:.3f}   "
          f"(target >= 0.9; tool wait excluded)")
    print(f"  ratio loop / raw (turn-batched)      = {ratios['loop/raw_turn']:.3f}")
    print(f"  ratio loop / raw (single-shot)       = {ratios['loop/raw_single']:.3f}")
    print(f"  ratio loop incl. tool wait / raw     = {ratios['loop_with_tools/raw_same']:.3f}")
    print(f"  ratio engine calls in loop / raw     = {ratios['engine_in_loop/raw_same']:.3f}   "
          f"(same calls, timed inside vs outside the loop)")
    return ratios


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engines", default="hf,vllm", help="comma-separated engine names")
    ap.add_argument("--groups", type=int, default=32, help="concurrent groups (prompts) per round")
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5, help="measured rounds per variant (after two warm-up rounds)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for the engine")
    ap.add_argument("--tools", default="pool,local", help="tool variants: pool (real Ray tool pool), local")
    ap.add_argument("--tool-threads", type=int, default=8,
                    help="concurrent tool calls (a run's tools.python.workers x tools.max_inflight_per_worker)")
    ap.add_argument("--cache-dir", default=None, help="model.cache_dir (tiny model + SFT; default: config's)")
    ap.add_argument("overrides", nargs="*", help="extra config overrides (key=value)")
    args = ap.parse_args(argv)
    tool_kinds = [t.strip() for t in args.tools.split(",") if t.strip()]
    if not tool_kinds or set(tool_kinds) - {"pool", "local"}:
        ap.error(f"--tools {args.tools!r}: expected a comma-separated subset of pool,local")
    # As a Ray actor with num_cpus=threads gets it. Without it vLLM-CPU sizes its attention thread pool from
    # the cores it sees at start-up and aborts ("thread_num == thread_num") once the process is pinned to one.
    os.environ["OMP_NUM_THREADS"] = str(args.threads)

    import torch

    from tepo_ray.config import load_config
    from tepo_ray.prepare import prepare_data
    from tepo_ray.engines import vllm_available

    torch.set_num_threads(args.threads)
    cfg = load_config([DEMO], [*TINY, *([f"model.cache_dir={args.cache_dir}"] if args.cache_dir else []),
                               *args.overrides])
    t0 = time.perf_counter()
    data = prepare_data(cfg, progress=False)
    items = data.train_items[: args.groups]
    print(f"model {data.model_path} (prepare_data {time.perf_counter() - t0:.1f}s); {args.groups} groups x "
          f"{args.group_size} = {args.groups * args.group_size} concurrent trajectories; engine.max_new_tokens="
          f"{cfg.engine.max_new_tokens} max_turn_tokens={cfg.engine.max_turn_tokens} max_turns={cfg.engine.max_turns}; "
          f"torch threads {torch.get_num_threads()}; tool threads {args.tool_threads}", flush=True)
    results: dict[str, dict[str, float]] = {}
    for name in [e.strip() for e in args.engines.split(",") if e.strip()]:
        if name == "vllm":
            ok, why = vllm_available()
            if not ok:
                print(f"vllm skipped: {why}")
                continue
        for res in bench_engine(name, cfg=cfg, model_path=data.model_path, items=items,
                                group_size=args.group_size, repeats=args.repeats, tool_kinds=tool_kinds,
                                tool_threads=args.tool_threads):
            results[f"{name}/{res['kind']}/{res['mode']}"] = _report(res)
    print("\nsummary: loop / raw (same calls), tool wait excluded (target >= 0.9)")
    for key, r in results.items():
        print(f"  {key:<22} {r['loop/raw_same']:.3f}   (engine calls in loop / raw {r['engine_in_loop/raw_same']:.3f})")
    return results


if __name__ == "__main__":
    main()
