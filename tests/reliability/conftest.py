"""Fixtures for reliability tests: a tiny real model (no SFT) for no-Ray tests, and the e2e tiny
SFT-warm-started run (real local Ray) for fault-injection runs.

`TEPO_TEST_CACHE` reuses one model cache across sessions (as in tests/e2e).
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

CONFIGS = Path(__file__).resolve().parents[2] / "experiments" / "configs"
CONFIG_FILES = [CONFIGS / "demo.yaml", CONFIGS / "tiny.yaml"]


@pytest.fixture(scope="session")
def rel_cache(tmp_path_factory) -> Path:
    env = os.environ.get("TEPO_TEST_CACHE")
    return Path(env) if env else tmp_path_factory.mktemp("tepo_rel_cache")


@pytest.fixture(scope="session")
def tiny_model_dir(rel_cache) -> str:
    """An untrained 2-layer, 128-wide Qwen2 with a tokenizer trained on agent-format text."""
    from tepo_ray.config import ModelConfig
    from tepo_ray.models import ensure_model

    rng = random.Random(0)
    texts = []
    for _ in range(100):
        a, b = rng.randint(10, 999), rng.randint(10, 99)
        texts.append(f"Question: what is {a} * {b}?\n<think>tool</think><python>print({a}*{b})</python>"
                     f"<result>\n{a * b}\n</result><answer>{a * b}</answer>")
    cfg = ModelConfig(cache_dir=str(rel_cache), hidden_size=128, num_layers=2, num_heads=2, num_kv_heads=1,
                      intermediate_size=256, max_position_embeddings=512, vocab_size=400, seed=0)
    return ensure_model(cfg, corpus_texts=texts)


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    started = False
    if not ray.is_initialized():
        ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, object_store_memory=512 * 1024**2,
                 _system_config={"worker_niceness": 0}, logging_level="WARNING")
        started = True
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def tiny_overrides(rel_cache, ray_cluster) -> list[str]:
    """Overrides for a tiny, fast training run; the SFT warm start is built once here."""
    from tepo_ray.config import load_config
    from tepo_ray.prepare import prepare_data

    overrides = [f"model.cache_dir={rel_cache}", "logging.wandb_mode=offline"]
    prepare_data(load_config(CONFIG_FILES, overrides), progress=False)
    return overrides
