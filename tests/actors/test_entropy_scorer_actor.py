"""EntropyScorerWorker as a real Ray actor: same numbers as the plain scorer, each version's weights,
and a restarted scorer finds published versions in the weights directory on its own."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest
import torch

from actors.entropy_scorer import EntropyScorerActor, EntropyScorerWorker
from tepo_ray.config import AlgoConfig
from tepo_ray.models.tiny import save_weights_safetensors
from tepo_ray.records import Segment, ToolCall, Trajectory
from tepo_ray.trainer.checkpoint import load_policy, weight_file_path
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


def _trajectory(uid: str, *, seed: int, version: int, calls: int = 2) -> Trajectory:
    rng = random.Random(seed)
    ids, mask, segments, tool_calls = [rng.randrange(1, VOCAB) for _ in range(4)], [0] * 4, [], []
    for k in range(calls + 1):
        start = len(ids)
        ids += [rng.randrange(1, VOCAB) for _ in range(4 + k)]
        mask += [1] * (4 + k)
        segments.append(Segment(start, len(ids), k if k < calls else None))
        if k < calls:
            tool_calls.append(ToolCall(tool="search", argument="q", segment_index=k))
            ids += [rng.randrange(1, VOCAB) for _ in range(3)]
            mask += [0] * 3
    return Trajectory(uid=uid, group_id="g", prompt_id="p", token_ids=ids, loss_mask=mask,
                      versions=[version if m else -1 for m in mask], prompt_len=4, segments=segments,
                      tool_calls=tool_calls, gold=["x"])


def _publish_perturbed(model_path: str, weights_dir: Path, version: int) -> None:
    model = load_policy(model_path)
    torch.manual_seed(version)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    save_weights_safetensors(model, weight_file_path(weights_dir, version))


def _wait_ready(actor, *, not_pid: int | None = None, timeout_s: float = 120.0) -> dict:
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


def test_scorer_actor_matches_plain_scorer_per_version(ray_local, tmp_path: Path) -> None:
    import ray

    model_path = _tiny_model(tmp_path / "model")
    weights = tmp_path / "weights"
    _publish_perturbed(model_path, weights, 1)
    trajs = [_trajectory("a", seed=1, version=0), _trajectory("b", seed=2, version=1)]
    cfg = AlgoConfig(entropy_window=3)
    expected = EntropyScorer(model_path, algo_cfg=cfg, weights_dir=weights).score(
        [Trajectory.from_dict(t.to_dict()) for t in trajs]
    )

    actor = EntropyScorerActor.options(num_cpus=1, max_restarts=-1).remote(model_path, algo_cfg=cfg)
    try:
        assert _wait_ready(actor)["version"] == 0
        # The driver sends the behaviour version's path with the batch; the scorer knows nothing else.
        as_dicts = ray.get(actor.score.remote([t.to_dict() for t in trajs], weights_path=str(
            weight_file_path(weights, 1)), version=1))  # dicts in -> dicts out
        as_objects = ray.get(actor.score.remote(trajs))  # objects in -> objects out
        assert isinstance(as_dicts[0], dict) and isinstance(as_objects[0], Trajectory)
        for got_d, got_o, exp in zip(as_dicts, as_objects, expected):
            got_d = Trajectory.from_dict(got_d)
            for got in (got_d, got_o):
                assert got.entropies == pytest.approx(exp.entropies, abs=1e-6)
                assert got.behaviour_logprobs == pytest.approx(exp.behaviour_logprobs, abs=1e-6)
                assert [c.delta_entropy for c in got.tool_calls] == pytest.approx(
                    [c.delta_entropy for c in exp.tool_calls], abs=1e-6)
                assert got.meta["scored_versions"] == exp.meta["scored_versions"]
        # v0 and v1 really are different weights, so the per-version choice matters.
        assert as_objects[1].entropies != pytest.approx(
            EntropyScorer(model_path, algo_cfg=cfg).score([_trajectory("b0", seed=2, version=0)])[0].entropies,
            abs=1e-4)
        stats = ray.get(actor.stats.remote())
        assert stats["weight_loads"] >= 1
    finally:
        ray.kill(actor, no_restart=True)

    # What Ray does on a restart: the same constructor, no registrations; v2 and v3 appear later.
    # The driver sends v3's path; v2 is found next to it.
    _publish_perturbed(model_path, weights, 2)
    _publish_perturbed(model_path, weights, 3)
    restarted = EntropyScorerWorker(model_path, algo_cfg=cfg)
    t2 = restarted.score([_trajectory("c", seed=3, version=2)], weights_path=str(weight_file_path(weights, 3)),
                         version=3)[0]
    ref = EntropyScorer(model_path, algo_cfg=cfg, weights_dir=weights).score([_trajectory("c", seed=3, version=2)])[0]
    assert t2.entropies == pytest.approx(ref.entropies, abs=1e-6)
    assert restarted.ready()["version"] == 2
