"""Shared fixtures for end-to-end runs: one local Ray and one tiny SFT-warm-started model per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from e2e_configs import CONFIG_FILES


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
    from tepo_ray.prepare import prepare_data

    overrides = [f"model.cache_dir={e2e_cache}", "logging.wandb_mode=offline"]
    cfg = load_config(CONFIG_FILES, overrides)
    prepare_data(cfg, progress=False)
    return overrides
