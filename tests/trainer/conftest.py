"""Fixtures for trainer tests (builders live in trainer_factories.py)."""

from __future__ import annotations

import pytest

from tepo_ray.config import AlgoConfig, TrainerConfig
from trainer_factories import tiny_model, tiny_tied_model  # noqa: F401 (session fixtures)


@pytest.fixture
def algo_cfg() -> AlgoConfig:
    return AlgoConfig(mode="dense", alpha=0.5, lr=1e-3, entropy_chunk_size=7, clip_low=0.2, clip_high=0.28)


@pytest.fixture
def trainer_cfg() -> TrainerConfig:
    return TrainerConfig(micro_batch_size=3, checkpoint_interval=2, keep_checkpoints=2)
