"""Shared fixtures for end-to-end runs: one local Ray and one tiny SFT-warm-started model per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# A tiny Qwen2 (head_dim 64, as vLLM on CPU needs) warm-started by a short SFT on arithmetic demos.
TINY = [
    "model.hidden_size=128",
    "model.num_heads=2",
    "model.num_kv_heads=1",
    "model.num_layers=2",
    "model.intermediate_size=256",
    "model.vocab_size=384",
    "data.task=arithmetic",
    "data.num_train=256",
    "data.num_eval=8",
    "trainer.sft_steps=120",
    "trainer.sft_batch_size=32",
    "engine.max_new_tokens=64",
    "engine.max_turn_tokens=40",
    "engine.max_context=160",
    "algo.group_size=4",
    "async.rollout_batch_groups=2",
    "logging.progress=false",
    "logging.wandb_mode=offline",
]


@pytest.fixture(scope="session")
def e2e_cache(tmp_path_factory) -> Path:
    """Model/SFT cache shared by every e2e test (TEPO_TEST_CACHE reuses one across sessions)."""
    env = os.environ.get("TEPO_TEST_CACHE")
    return Path(env) if env else tmp_path_factory.mktemp("tepo_cache")


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, object_store_memory=512 * 1024**2,
                 _system_config={"worker_niceness": 0})
    yield ray


@pytest.fixture(scope="session")
def tiny_overrides(e2e_cache, ray_cluster) -> list[str]:
    """Overrides for a tiny, fast run; the SFT warm start is built once here."""
    from tepo_ray.config import load_config
    from tepo_ray.data.world import prepare_data

    overrides = [f"model.cache_dir={e2e_cache}", *TINY]
    cfg = load_config([Path(__file__).resolve().parents[2] / "experiments" / "configs" / "demo.yaml"], overrides)
    prepare_data(cfg, progress=False)
    return overrides
