"""vLLM knobs from the engine config, and the placement-group layout of a tensor-parallel generator (no vLLM needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tepo_ray.config import ConfigError, EngineConfig, EngineName, load_config
from tepo_ray.engines.vllm_engine import vllm_engine_kwargs
from tepo_ray.topology import TP_ROLE, plan_topology

CONFIGS = Path(__file__).resolve().parents[2] / "experiments" / "configs"


def test_knobs_pass_through() -> None:
    kw = vllm_engine_kwargs(EngineConfig(name=EngineName.VLLM, tensor_parallel_size=4, enable_prefix_caching=False,
                                         attention_backend="flashinfer", max_num_batched_tokens=8192))
    assert kw == {"enable_prefix_caching": False, "tensor_parallel_size": 4, "distributed_executor_backend": "ray",
                  "attention_backend": "FLASHINFER", "max_num_batched_tokens": 8192}
    assert "distributed_executor_backend" not in vllm_engine_kwargs(EngineConfig(name=EngineName.VLLM))


def test_tp_generator_gets_one_gpu_bundle_per_rank() -> None:
    cfg = load_config([CONFIGS / "demo.yaml"], ["engine.name=vllm", "engine.tensor_parallel_size=2",
                                                "topology.generators.num_gpus=2", "topology.generators.replicas=2"])
    plan = plan_topology(cfg)
    gens = plan.for_role("generators")
    assert [b.num_gpus for b in gens] == [0.0, 0.0]  # the actors hold no GPU; vLLM's workers do
    for g in gens:
        idx = plan.tp_bundle_indices(g.replica)
        assert len(idx) == 2 and all(plan.bundle_specs()[i] == {"GPU": 1.0} for i in idx)
        assert idx == [g.index + 1, g.index + 2]  # right after the actor's bundle
    assert len(plan.for_role(TP_ROLE)) == 4 and plan.total_gpus == 4


@pytest.mark.parametrize(("overrides", "key"), [
    (["engine.name=hf", "engine.tensor_parallel_size=2", "topology.generators.num_gpus=2"],
     "engine.tensor_parallel_size"),
    (["engine.name=vllm", "engine.tensor_parallel_size=2", "topology.generators.num_gpus=1"],
     "topology.generators.num_gpus"),
    (["engine.tensor_parallel_size=0"], "engine.tensor_parallel_size"),
    (["weights.transport=nfs"], "weights.transport"),
    (["weights.bucket_mb=0"], "weights.bucket_mb"),
])
def test_bad_knobs_name_the_key(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config([CONFIGS / "demo.yaml"], overrides)
