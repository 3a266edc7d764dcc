"""FSDP2 mixed precision (bf16 compute, fp32 master weights and gradient reduction) on CPU, world of one."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch

from tepo_ray.config import AlgoConfig, TrainerConfig
from tepo_ray.trainer.learner import Learner, LearnerMetric
from tepo_ray.trainer.scorer import EntropyScorer

from trainer_factories import make_group


def test_bf16_compute_keeps_fp32_master_weights(world_of_one, tiny_model: str, tmp_path: Path) -> None:
    batch = EntropyScorer(tiny_model, algo_cfg=AlgoConfig()).score(make_group("g0", scores=[1.0, 0.0, 0.5], seed=2))
    cfg = dict(algo_cfg=AlgoConfig(mode="grpo", lr=1e-3, entropy_chunk_size=4),
               trainer_cfg=TrainerConfig(micro_batch_size=2, gradient_checkpointing=True), seed=0)
    bf16 = Learner(tiny_model, run_dir=tmp_path / "bf16", sharded=True, dtype="bfloat16", **cfg)
    fp32 = Learner(tiny_model, run_dir=tmp_path / "fp32", **cfg)
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters())

    m_bf16 = bf16.compute_gradients(copy.deepcopy(batch))
    m_fp32 = fp32.compute_gradients(copy.deepcopy(batch))
    assert all(p.grad.dtype == torch.float32 for p in bf16.model.parameters())
    # bf16 compute: the loss and gradient agree with fp32 to bf16 precision (~1e-2 relative), not exactly
    assert math.isfinite(m_bf16[LearnerMetric.LOSS])
    assert abs(m_bf16[LearnerMetric.LOSS] - m_fp32[LearnerMetric.LOSS]) <= 0.05 * abs(m_fp32[LearnerMetric.LOSS]) + 1e-3
    g16 = torch.cat([p.grad.full_tensor().flatten() for p in bf16.model.parameters()])
    g32 = torch.cat([p.grad.flatten() for p in fp32.model.parameters()])
    assert float(torch.nn.functional.cosine_similarity(g16, g32, dim=0)) > 0.99
    assert not torch.equal(g16, g32)  # really computed in bf16
