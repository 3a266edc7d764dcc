"""LearnerActor on a real local Ray: a step publishes loadable weights; a restarted actor resumes from its
checkpoint."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest
import torch

from actors.learner import LearnerActor, LearnerWorker
from tepo_ray.config import AlgoConfig, TrainerConfig
from tepo_ray.records import Segment, ToolCall, Trajectory
from tepo_ray.trainer.checkpoint import load_policy, load_weights_into
from tepo_ray.trainer.scorer import EntropyScorer

pytestmark = pytest.mark.ray

VOCAB = 128


def _tiny_model(out: Path) -> str:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                 intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=128,
                                 initializer_range=0.2)).save_pretrained(str(out))
    return str(out)


def _trajectory(uid: str, group: str, *, seed: int, score: float, calls: int) -> Trajectory:
    """[prompt 4][gen][obs]...[gen]: `calls` tool calls, each closing one generated segment."""
    rng = random.Random(seed)
    ids, mask, segments, tool_calls = [rng.randrange(1, VOCAB) for _ in range(4)], [0] * 4, [], []
    for k in range(calls + 1):
        start = len(ids)
        ids += [rng.randrange(1, VOCAB) for _ in range(5)]
        mask += [1] * 5
        segments.append(Segment(start, len(ids), k if k < calls else None))
        if k < calls:
            tool_calls.append(ToolCall(tool="python", argument="1+1", segment_index=k))
            ids += [rng.randrange(1, VOCAB) for _ in range(3)]
            mask += [0] * 3
    return Trajectory(uid=uid, group_id=group, prompt_id=group, token_ids=ids, loss_mask=mask,
                      versions=[0 if m else -1 for m in mask], prompt_len=4, segments=segments,
                      tool_calls=tool_calls, gold=["2"], score=score)


def _batch(model_path: str, seed: int) -> list[Trajectory]:
    trajs = [_trajectory(f"{seed}-{i}", f"g{seed}", seed=seed * 10 + i, score=float(i % 2), calls=i % 3)
             for i in range(4)]
    return EntropyScorer(model_path, algo_cfg=AlgoConfig()).score(trajs)


def _wait_ready(actor, *, not_pid: int | None = None, timeout_s: float = 120.0) -> dict:
    """ready() of the actor, once it answers from a process other than `not_pid` (ray.kill is async)."""
    import ray

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            info = ray.get(actor.ready.remote(), timeout=timeout_s)
            if info["pid"] != not_pid:
                return info
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"actor did not come back within {timeout_s} s")
        time.sleep(0.5)


def _learner_kwargs(tmp_path: Path, model_path: str) -> dict:
    return dict(
        model_path=model_path,
        algo_cfg=AlgoConfig(mode="dense", lr=1e-3),
        trainer_cfg=TrainerConfig(micro_batch_size=2, checkpoint_dir=str(tmp_path / "ckpt")),
        run_dir=str(tmp_path / "run"),
        seed=0,
    )


def test_learner_actor_steps_publishes_and_checkpoints(ray_local, tmp_path: Path) -> None:
    import ray

    model_path = _tiny_model(tmp_path / "model")
    kwargs = _learner_kwargs(tmp_path, model_path)
    actor = LearnerActor.options(num_cpus=1, max_restarts=-1).remote(**kwargs)
    try:
        info = _wait_ready(actor)
        assert info["version"] == 0 and info["restored"] is False

        metrics = ray.get(actor.train_step.remote(_batch(model_path, 1)))
        assert metrics["learner/version"] == 1.0 and metrics["learner/grad_norm"] > 0
        assert [r for _, _, r in ray.get(actor.last_rewards.remote())] == pytest.approx([0.0, 1.0, 0.0, 1.0])
        path, version = ray.get(actor.latest_weights.remote())
        assert version == 1 and Path(path).is_file()
        v1 = load_policy(model_path)
        load_weights_into(v1, path)
        initial = load_policy(model_path)
        assert not torch.equal(v1.lm_head.weight, initial.lm_head.weight)

        ray.get(actor.save_checkpoint.remote({"cursor": 1}))
        batch2 = [t.to_dict() for t in _batch(model_path, 2)]  # the driver sends dicts
        metrics, update2, version2 = ray.get(actor.train_step_and_publish.remote(batch2))
        assert update2["kind"] == "file" and update2["version"] == 2
        assert version2 == 2 and Path(update2["path"]).name == "v2.safetensors" and metrics["learner/version"] == 2.0
        assert Path(update2["path"]).is_file()
        assert ray.get(actor.state.remote()) == {"step": 2, "version": 2}
    finally:
        ray.kill(actor, no_restart=True)

    # What Ray does on a restart: the same constructor with the same arguments.
    restarted = LearnerWorker(**kwargs)
    assert restarted.ready()["restored"] is True
    assert restarted.state() == {"step": 1, "version": 1}
    assert restarted.restored() == {"cursor": 1}
    assert restarted.restore() == {"cursor": 1}  # explicit restore (the driver's --resume) is idempotent
    assert restarted.restore(str(tmp_path / "elsewhere")) is None
    assert not (tmp_path / "run" / "weights" / "v2.safetensors").exists()  # the lost step's weights are gone
    again = load_policy(model_path)
    load_weights_into(again, restarted.latest_weights()[0])
    for name, v in again.state_dict().items():
        assert torch.equal(v, v1.state_dict()[name]), name


@pytest.mark.slow
def test_killed_learner_actor_comes_back_from_its_checkpoint(ray_local, tmp_path: Path) -> None:
    import ray

    model_path = _tiny_model(tmp_path / "model")
    actor = LearnerActor.options(num_cpus=1, max_restarts=-1).remote(**_learner_kwargs(tmp_path, model_path))
    try:
        info = _wait_ready(actor)
        ray.get(actor.train_step.remote(_batch(model_path, 1)))
        ray.get(actor.save_checkpoint.remote({"cursor": 1}))
        ray.get(actor.train_step.remote(_batch(model_path, 2)))

        ray.kill(actor, no_restart=False)  # Ray restarts it (max_restarts=-1) with the same arguments
        info = _wait_ready(actor, not_pid=info["pid"])
        assert info["restored"] is True and info["version"] == 1 and info["step"] == 1
        assert ray.get(actor.restored.remote()) == {"cursor": 1}
        metrics = ray.get(actor.train_step.remote(_batch(model_path, 2)))
        assert metrics["learner/version"] == 2.0
    finally:
        ray.kill(actor, no_restart=True)
