"""Fixtures for the distributed tests: the trainer tests' tiny model and trajectory builders."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trainer"))

from trainer_factories import tiny_model, tiny_tied_model  # noqa: E402,F401 (session fixtures)


@pytest.fixture
def world_of_one():
    """A gloo process group of one rank in this process (real FSDP2 / DCP code paths, no spawn)."""
    from tepo_ray.distributed import process_group

    process_group.init_process_group(rank=0, world_size=1, master_addr="127.0.0.1",
                                     master_port=process_group.free_port(), timeout_s=60)
    try:
        yield
    finally:
        process_group.destroy()
