"""Bad input, configs: each wrong config fails in `load_config` (before any actor or Ray starts) with
one message that names the dotted key and says what is allowed (the fix)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tepo_ray.config import ConfigError, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "experiments" / "configs"
DEMO = CONFIGS / "demo.yaml"

# (id, overrides, key the message must name, fix the message must contain)
BAD = [
    ("mode-unknown", ["algo.mode=ppo"], "algo.mode", "grpo"),
    ("group-size-1", ["algo.group_size=1"], "algo.group_size", ">= 2"),
    ("lr-zero", ["algo.lr=0"], "algo.lr", "> 0"),
    ("lr-not-number", ["algo.lr=fast"], "algo.lr", "could not be converted to Float"),
    ("clip-negative", ["algo.clip_low=-0.2"], "algo.clip_low", "> 0"),
    ("kl-negative", ["algo.kl_coef=-1"], "algo.kl_coef", ">= 0"),
    ("entropy-window-0", ["algo.entropy_window=0"], "algo.entropy_window", "> 0"),
    ("loss-agg-unknown", ["algo.loss_agg=sum"], "algo.loss_agg", "token_mean"),
    ("grad-norm-0", ["algo.max_grad_norm=0"], "algo.max_grad_norm", "> 0"),
    ("staleness-negative", ["async.max_staleness=-1"], "async.max_staleness", ">= 0"),
    ("inflight-0", ["async.max_inflight_groups=0"], "async.max_inflight_groups", ">= 1"),
    ("batch-groups-0", ["async.rollout_batch_groups=0"], "async.rollout_batch_groups", ">= 1"),
    ("engine-unknown", ["engine.name=tgi"], "engine.name", "vllm"),
    ("temperature-negative", ["engine.temperature=-1"], "engine.temperature", ">= 0"),
    ("top-p-0", ["engine.top_p=0"], "engine.top_p", "(0, 1]"),
    ("new-tokens-0", ["engine.max_new_tokens=0"], "engine.max_new_tokens", "> 0"),
    ("new-tokens-over-context", ["engine.max_new_tokens=100000"], "engine.max_new_tokens", "engine.max_context"),
    ("turn-tokens-0", ["engine.max_turn_tokens=0"], "engine.max_turn_tokens", "> 0"),
    ("turns-negative", ["engine.max_turns=-1"], "engine.max_turns", ">= 0"),
    ("gpu-mem-2", ["engine.gpu_memory_utilization=2"], "engine.gpu_memory_utilization", "(0, 1]"),
    ("steps-negative", ["trainer.steps=-1"], "trainer.steps", ">= 0"),
    ("micro-batch-0", ["trainer.micro_batch_size=0"], "trainer.micro_batch_size", ">= 1"),
    ("keep-ckpt-0", ["trainer.keep_checkpoints=0"], "trainer.keep_checkpoints", ">= 1"),
    ("ckpt-interval-negative", ["trainer.checkpoint_interval=-1"], "trainer.checkpoint_interval", ">= 0"),
    ("wandb-mode", ["logging.wandb_mode=cloud"], "logging.wandb_mode", "offline"),
    ("py-max-workers-0", ["tools.python.max_workers=0"], "tools.python.max_workers", ">="),
    ("py-timeout-0", ["tools.python.call_timeout_s=0"], "tools.python.call_timeout_s", "> 0"),
    ("search-backend", ["tools.search.backend=elastic"], "tools.search.backend", "bm25"),
    ("search-top-k-0", ["tools.search.top_k=0"], "tools.search.top_k", "> 0"),
    ("dtype-int8", ["model.dtype=int8"], "model.dtype", "bfloat16"),
    ("vocab-tiny", ["model.vocab_size=8"], "model.vocab_size", ">= 64"),
    ("task-unknown", ["data.task=chess"], "data.task", "arithmetic"),
    ("num-train-0", ["data.num_train=0"], "data.num_train", "> 0"),
    ("typo-key", ["algo.modee=dense"], "algo.modee", "did you mean 'algo.mode'"),
    ("typo-section", ["trainr.steps=3"], "trainr", "did you mean 'trainer'"),
    ("py-workers-over-max", ["tools.python.workers=9", "tools.python.max_workers=4"], "tools.python.workers",
     "raise max_workers"),
    ("obs-chars-0", ["tools.max_observation_chars=0"], "tools.max_observation_chars", "> 0"),
    ("inflight-per-worker-0", ["tools.max_inflight_per_worker=0"], "tools.max_inflight_per_worker", ">= 1"),
    ("turn-tokens-over-context", ["engine.max_turn_tokens=100000", "engine.max_new_tokens=100"],
     "engine.max_turn_tokens", "engine.max_context"),
    ("strategy-unknown", ["topology.strategy=RANDOM"], "topology.strategy", "PACK"),
    ("override-without-equals", ["algo.mode"], "algo.mode", "key=value"),
]


@pytest.mark.parametrize(("overrides", "key", "fix"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_config_fails_naming_key_and_fix(overrides, key, fix):
    assert len(BAD) >= 25
    with pytest.raises(ConfigError) as err:
        load_config([DEMO], overrides)
    msg = str(err.value)
    assert key in msg and fix in msg, msg
    assert "\n" not in msg.strip(), f"expected one message line, got: {msg}"


def test_missing_config_file_names_the_path(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=r"nope\.yaml does not exist"):
        load_config([missing])


def test_yaml_syntax_error_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("algo:\n  mode: [dense\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: cannot parse YAML"):
        load_config([bad])


def test_top_level_list_is_rejected(tmp_path):
    bad = tmp_path / "list.yaml"
    bad.write_text("- algo\n- engine\n")
    with pytest.raises(ConfigError, match=r"list\.yaml: top level must be a mapping"):
        load_config([bad])
