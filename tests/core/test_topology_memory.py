"""`tepo-ray topology` memory plan: model size from config.json or hints, per-role estimates, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tepo_ray.config import ConfigError, load_config
from tepo_ray.topology_memory import GiB, model_shape, plan_memory

CFG_8 = "experiments/configs/qwen2.5-7b_dense_8gpu.yaml"
CFG_16 = "experiments/configs/qwen2.5-7b_dense_16gpu_2node.yaml"
QWEN7B = {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
          "num_key_value_heads": 4, "vocab_size": 152064, "tie_word_embeddings": False, "model_type": "qwen2"}


def test_param_count_formula_matches_a_real_qwen2_exactly(tmp_path: Path) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    hf = Qwen2Config(vocab_size=301, hidden_size=64, intermediate_size=176, num_hidden_layers=3,
                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    real = sum(p.numel() for p in Qwen2ForCausalLM(hf).parameters())
    hf.save_pretrained(tmp_path)
    cfg = load_config([], [f"model.path={tmp_path}"])
    shape = model_shape(cfg.model)
    assert shape.num_params == real and shape.source.endswith("config.json")


def test_qwen2_5_7b_size_from_its_config_json(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(QWEN7B))
    shape = model_shape(load_config([], [f"model.path={tmp_path}"]).model)
    assert abs(shape.num_params - 7_615_616_512) / 7_615_616_512 < 1e-3  # the model card's count


@pytest.mark.parametrize("path", [CFG_8, CFG_16])
def test_paper_scale_configs_fit(path: str) -> None:
    plan = plan_memory(load_config([path]))
    plan.check()
    assert {r.role for r in plan.roles} == {"learner", "scorers", "generators"}
    assert all(r.limit == 80 * GiB and r.total < r.limit for r in plan.roles)


def test_learner_state_is_sharded_over_ranks() -> None:
    def sharded(path: str) -> float:
        learner = next(r for r in plan_memory(load_config([path])).roles if r.role == "learner")
        return learner.grads + learner.optimizer

    assert sharded(CFG_16) == pytest.approx(sharded(CFG_8) / 2)  # 4 ranks vs 2 ranks, one GPU each


def test_more_than_one_gpu_per_learner_rank_is_refused() -> None:
    from tepo_ray.topology import plan_topology

    with pytest.raises(ConfigError, match="topology.learner.replicas"):
        plan_topology(load_config([CFG_8], ["topology.learner.num_gpus=2"]))


def test_7b_adamw_learner_on_one_80gb_gpu_is_refused_naming_the_key() -> None:
    from typer.testing import CliRunner

    from tepo_ray.cli import app

    res = CliRunner().invoke(app, ["topology", CFG_8, "topology.learner.replicas=1"])
    assert res.exit_code == 2
    assert "topology.learner.replicas" in res.output and "learner" in res.output
    with pytest.raises(ConfigError, match="trainer.micro_batch_size"):  # static state fits, activations do not
        plan_memory(load_config([CFG_8], ["trainer.micro_batch_size=64"])).check()


def test_generator_kv_cache_must_hold_one_full_sequence() -> None:
    cfg = load_config([CFG_8], ["topology.generators.gpu_memory_gb=20", "engine.max_context=65536",
                                "engine.max_new_tokens=4096"])
    with pytest.raises(ConfigError, match="engine.max_context"):
        plan_memory(cfg).check()
    ok = load_config([CFG_8], ["topology.generators.gpu_memory_gb=20"])
    gen = next(r for r in plan_memory(ok).roles if r.role == "generators")
    assert gen.limit == 20 * GiB and gen.problem is None


def test_hub_id_without_local_config_needs_explicit_size() -> None:
    with pytest.raises(ConfigError, match="model.num_params"):
        model_shape(load_config([], ["model.path=tepo-ray-test/no-such-model"]).model)
    with pytest.raises(ConfigError, match="architecture fields give"):  # tiny defaults do not make 7B
        model_shape(load_config([], ["model.path=tepo-ray-test/no-such-model", "model.num_params=7000000000"]).model)


def test_cpu_roles_are_estimated_but_not_checked() -> None:
    plan = plan_memory(load_config(["experiments/configs/demo.yaml"]))
    plan.check()
    assert all(r.device == "cpu" and r.limit is None for r in plan.roles)
