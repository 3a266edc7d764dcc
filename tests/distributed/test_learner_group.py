"""LearnerGroup on a real local Ray: 2 LearnerActor ranks in one placement group form an FSDP2 group;
one fanned-out call trains, publishes and checkpoints like a single learner."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tepo_ray.config import AlgoConfig, TrainerConfig
from tepo_ray.trainer.learner import Learner
from tepo_ray.trainer.scorer import EntropyScorer

from trainer_factories import make_group

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ALGO = dict(mode="dense", alpha=0.5, lr=1e-3, entropy_chunk_size=5)


@dataclass
class _Bundle:
    index: int


def test_two_rank_group_trains_like_one_learner(tiny_model: str, tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from actors.learner import LearnerActor
    from tepo_ray.distributed.learner_group import LearnerGroup

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, logging_level="WARNING",
                 object_store_memory=256 * 2**20)
    pg = placement_group([{"CPU": 0.5}, {"CPU": 0.5}], strategy="PACK")
    group = None
    try:
        ray.get(pg.ready(), timeout=60)
        batch = EntropyScorer(tiny_model, algo_cfg=AlgoConfig()).score(
            make_group("g0", scores=[1.0, 0.0, 0.5], seed=0) + make_group("g1", scores=[0.0, 1.0], seed=1))
        group = LearnerGroup.create(
            LearnerActor, bundles=[_Bundle(0), _Bundle(1)],
            options=lambda b: dict(num_cpus=0.5, scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=pg, placement_group_bundle_index=b.index)),
            args=(tiny_model,),
            kwargs=dict(algo_cfg=AlgoConfig(**ALGO), trainer_cfg=TrainerConfig(micro_batch_size=2),
                        run_dir=str(tmp_path / "group"), seed=0, resume=False),
        )
        infos = ray.get([a.ready.remote() for a in group.actors], timeout=300)
        assert [(i["rank"], i["world_size"]) for i in infos] == [(0, 2), (1, 2)]
        assert len({i["pid"] for i in infos}) == 2

        metrics, update, version = ray.get(group.train_step_and_publish.remote(copy.deepcopy(batch)), timeout=300)
        path = update["path"]  # no weights_cfg: the file transport
        ckpt = ray.get(group.save_checkpoint.remote({"cursor": 1}), timeout=300)
    finally:
        if group is not None:
            for a in group.actors:
                ray.kill(a)
        remove_placement_group(pg)
        if started:
            ray.shutdown()

    single = Learner(tiny_model, algo_cfg=AlgoConfig(**ALGO), trainer_cfg=TrainerConfig(micro_batch_size=2),
                     run_dir=tmp_path / "single", seed=0)
    ref = single.train_step(copy.deepcopy(batch))
    assert version == 1 and Path(path).is_file()
    assert metrics["learner/loss"] == pytest.approx(ref["learner/loss"], rel=1e-5, abs=1e-7)
    assert metrics["learner/grad_norm"] == pytest.approx(ref["learner/grad_norm"], rel=1e-5)
    from safetensors.torch import load_file

    published = load_file(path)
    ref_state = single.model.state_dict()
    far = sum(int(((published[k] - v).abs() > 1e-6).sum()) for k, v in ref_state.items())
    assert far <= 1e-3 * sum(v.numel() for v in ref_state.values())
    assert (Path(ckpt) / "dcp" / ".metadata").is_file()
