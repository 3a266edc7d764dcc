"""Config composition, overrides and errors that name the field."""

import pytest
import yaml

from tepo_ray.config import AlgoMode, ConfigError, load_config, save_resolved, to_yaml


def test_defaults_and_overrides():
    cfg = load_config([], ["algo.mode=sparse", "algo.alpha=1.0", "async.max_staleness=3"])
    assert cfg.algo.mode == AlgoMode.SPARSE
    assert cfg.algo.alpha == 1.0
    assert cfg.async_.max_staleness == 3


def test_yaml_composition_left_to_right(tmp_path):
    a = tmp_path / "a.yaml"
    b = tmp_path / "b.yaml"
    a.write_text("algo:\n  mode: grpo\n  alpha: 0.1\nasync:\n  max_staleness: 0\n")
    b.write_text("algo:\n  alpha: 0.5\n")
    cfg = load_config([a, b], ["trainer.steps=7"])
    assert cfg.algo.mode == AlgoMode.GRPO and cfg.algo.alpha == 0.5
    assert cfg.async_.max_staleness == 0 and cfg.trainer.steps == 7


@pytest.mark.parametrize(
    ("override", "needles"),
    [
        ("algo.alpah=1", ["algo.alpah", "did you mean 'algo.alpha'"]),
        ("asynk.max_staleness=1", ["asynk", "'async'"]),
        ("algo.alpha=-0.1", ["algo.alpha", "-0.1", ">= 0"]),
        ("algo.group_size=1", ["algo.group_size", "1", ">= 2"]),
        ("algo.clip_low=0", ["algo.clip_low", "> 0"]),
        ("algo.clip_high=-1", ["algo.clip_high", "> 0"]),
        ("async.max_staleness=-1", ["async.max_staleness", ">= 0"]),
        ("algo.mode=ppo", ["algo.mode", "ppo"]),
        ("algo.lr=fast", ["algo.lr", "fast"]),
        ("algo.sparse.no_tool_value=maybe", ["algo.sparse.no_tool_value", "'score' or a number"]),
        ("tools.python.max_workers=0", ["tools.python.max_workers"]),
    ],
)
def test_bad_values_name_the_field(override, needles):
    with pytest.raises(ConfigError) as err:
        load_config([], [override])
    for needle in needles:
        assert needle in str(err.value), str(err.value)


def test_bad_yaml_file_names_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("algo:\n  mode: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config([bad])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config([tmp_path / "missing.yaml"])
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("algo:\n  alfa: 1\n")
    with pytest.raises(ConfigError, match=r"unknown.yaml.*algo.alfa.*algo.alpha"):
        load_config([unknown])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config([], ["algo.mode=dense", "async.max_staleness=2"])
    path = save_resolved(cfg, tmp_path)
    data = yaml.safe_load(path.read_text())
    assert data["algo"]["mode"] == "dense" and data["async"]["max_staleness"] == 2
    again = load_config([path])
    assert to_yaml(again) == to_yaml(cfg)


def test_shipped_configs_validate():
    from pathlib import Path

    cfg_dir = Path(__file__).resolve().parents[2] / "experiments" / "configs"
    files = sorted(cfg_dir.glob("*.yaml"))
    assert files, "experiments/configs holds no YAML"
    for f in files:
        load_config([f])
