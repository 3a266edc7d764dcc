"""Faults inside one generation actor (plain class, no Ray): weight loads, engine exceptions, empty
generations. Each test fails on the code before the reliability fixes (a hang, an error trajectory
returned for training, a group judged stale at version -1, a blocked event loop)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from actors.faults import EngineFaultGenerationWorker, FailingWeightLoadGenerationWorker
from tepo_ray.config import EngineConfig, EngineName
from tepo_ray.records import Trajectory
from tepo_ray.rollout import RolloutError

ITEM = {"id": "q0", "question": "what is 12 * 34?", "answers": ["408"], "task_type": "math"}
HANG_S = 60.0  # a rollout that is not back by then is hung


def _worker(cls, model_dir: str, **kw):
    cfg = EngineConfig(name=EngineName.HF, max_new_tokens=24, max_turn_tokens=12, max_turns=1, max_context=160)
    return cls(engine_cfg=cfg, model_path=model_dir, pools={}, max_observation_chars=200, **kw)


def _v1_weights(model_dir: str, out: Path) -> str:
    import torch
    from transformers import AutoModelForCausalLM

    from tepo_ray.models import save_weights_safetensors

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    return str(save_weights_safetensors(model, out))


def _generated_versions(trajs: list[dict]) -> set[int]:
    return {v for t in trajs for v, m in zip(t["versions"], t["loss_mask"]) if m}


def test_failed_weight_load_resolves_the_batch_and_stays_pending(tiny_model_dir, tmp_path):
    async def run():
        w = _worker(FailingWeightLoadGenerationWorker, tiny_model_dir, fail_loads=1)
        await w.set_weights(_v1_weights(tiny_model_dir, tmp_path / "v1.safetensors"), 1)
        first = await asyncio.wait_for(w.generate_group(ITEM, group_id="g1", group_size=2), HANG_S)
        second = await asyncio.wait_for(w.generate_group(ITEM, group_id="g2", group_size=2), HANG_S)
        return w, first, second

    w, first, second = asyncio.run(run())
    # the first batch ran on the weights really loaded (v0) and says so; the update was retried, not lost
    assert _generated_versions(first) == {0}
    assert _generated_versions(second) == {1}
    stats = w.stats()
    assert stats["weight_load_failures"] == 1 and stats["weight_loads"] == 1 and stats["version"] == 1
    w.shutdown()


def test_weight_load_runs_off_the_event_loop(tiny_model_dir, tmp_path):
    """A 1.5 s weight load must not freeze the actor's event loop (admission, set_weights, stats)."""
    async def run():
        w = _worker(FailingWeightLoadGenerationWorker, tiny_model_dir, fail_loads=0, load_delay_s=1.5)
        await w.set_weights(_v1_weights(tiny_model_dir, tmp_path / "v1.safetensors"), 1)
        ticks: list[float] = []
        done = asyncio.Event()

        async def ticker():
            while not done.is_set():
                await asyncio.sleep(0.02)
                ticks.append(time.perf_counter())

        tick = asyncio.create_task(ticker())
        out = await asyncio.wait_for(w.generate_group(ITEM, group_id="g1", group_size=2), HANG_S)
        done.set()
        await tick
        return w, out, ticks

    w, out, ticks = asyncio.run(run())
    assert _generated_versions(out) == {1}
    (start, end), = w.load_windows
    during = [t for t in ticks if start < t < end]
    # a load on the loop itself allows no tick inside its window; off the loop, ~75 (fewer on a busy host)
    assert len(during) >= 10, f"only {len(during)} event-loop ticks during a {end - start:.2f} s weight load"
    w.shutdown()


def test_engine_exception_fails_only_the_bad_group_and_is_never_returned(tiny_model_dir):
    async def run():
        w = _worker(EngineFaultGenerationWorker, tiny_model_dir)
        res = await asyncio.wait_for(asyncio.gather(
            w.generate_group(ITEM, group_id="poison-1", group_size=2),
            w.generate_group(ITEM, group_id="ok-1", group_size=2),
            w.generate_group(ITEM, group_id="ok-2", group_size=2), return_exceptions=True), HANG_S)
        return w, res

    w, (bad, ok1, ok2) = asyncio.run(run())
    assert isinstance(bad, RolloutError) and "poisoned" in str(bad), bad
    for group in (ok1, ok2):  # batched with the poisoned request, yet not failed by it
        assert len(group) == 2 and all(t["finish_reason"] != "error" for t in group), group
    assert w.batcher.engine_failures >= 1
    w.shutdown()


def test_group_with_an_empty_generation_is_judged_by_its_samples(tiny_model_dir):
    from tepo_ray.driver import _Group

    async def run():
        # request ids are "<group>/<index>": only trajectory 0 of group "mix" generates nothing
        w = _worker(EngineFaultGenerationWorker, tiny_model_dir)
        return w, await asyncio.wait_for(w.generate_group(ITEM, group_id="mix-empty-x", group_size=1), HANG_S), \
            await asyncio.wait_for(w.generate_group(ITEM, group_id="mix", group_size=2), HANG_S)

    w, empty, normal = asyncio.run(run())
    trajs = [Trajectory.from_dict(d) for d in empty + normal]
    assert trajs[0].num_generated == 0 and trajs[0].behaviour_version == -1
    group = _Group(group_id="mix", item=ITEM, item_index=0, admitted_at=0, trajectories=trajs)
    assert group.behaviour_version == 0  # not -1: staleness at max_staleness=0 is 0, the group is trained
    only_empty = _Group(group_id="e", item=ITEM, item_index=1, admitted_at=3, trajectories=trajs[:1])
    assert only_empty.behaviour_version == 3
    w.shutdown()
