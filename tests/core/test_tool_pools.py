"""Which tool pools a run starts and their per-worker CPUs (no Ray needed for the plan)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from tepo_ray.config import load_config
from tepo_ray.tool_pools import enabled_tool_kinds, tools_cfg_for, worker_resources


def test_search_pool_needs_an_index_and_workers():
    cfg = load_config([], [])
    assert enabled_tool_kinds(cfg, index_dir=None) == ["python"]
    assert enabled_tool_kinds(cfg, index_dir="/idx") == ["python", "search"]
    assert enabled_tool_kinds(load_config([], ["tools.python.workers=0"]), index_dir="/idx") == ["search"]
    assert tools_cfg_for(cfg, "search", "/idx").search.index_dir == "/idx"


def test_workers_share_the_bundles_cpus():
    res = worker_resources([SimpleNamespace(num_cpus=0.5), SimpleNamespace(num_cpus=0.5)], 4)
    assert res.num_cpus == pytest.approx(0.25) and res.num_gpus == 0.0


def test_eval_data_arguments():
    from tepo_ray.evaluate import parse_data_args

    assert parse_data_args(["hotpotqa=a.json", "aime:2025=b.parquet", "aime:2024=c.jsonl"]) == {
        "hotpotqa": ("hotpotqa", "a.json"), "2025": ("aime", "b.parquet"), "2024": ("aime", "c.jsonl")}
    with pytest.raises(ValueError, match="NAME=PATH"):
        parse_data_args(["hotpotqa"])
    with pytest.raises(ValueError, match="given twice"):
        parse_data_args(["gsm8k=a.jsonl", "gsm8k=b.jsonl"])
