"""Shared fixtures for actor integration tests: one local Ray session for the whole test run.

`ray_local` starts `ray.init(num_cpus=2)` once per pytest session (actor start-up
costs ~1-2 s here, a Ray start ~3-9 s) and shuts it down at the end. If Ray is
already initialized (another conftest, a developer's session), it is reused and
left running. Tests must release what they create (kill actors, close pools) so
the 2 CPUs stay available to the next test.

Classes defined in a test module are not importable by Ray workers (pytest puts
the test directory on the driver's sys.path only). A module that defines actor
classes ships them by value with
`ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])`.
"""

from __future__ import annotations

import os
from typing import Iterator

import pytest


@pytest.fixture(scope="session")
def ray_local() -> Iterator[dict]:
    """A local Ray cluster with 2 CPUs; yields `ray.cluster_resources()`."""
    ray = pytest.importorskip("ray")
    started = False
    if not ray.is_initialized():
        ray.init(
            num_cpus=2,
            num_gpus=0,
            include_dashboard=False,
            # A small object store: several test sessions may share this machine's memory.
            object_store_memory=int(os.environ.get("TEPO_TEST_OBJECT_STORE_MB", "512")) * 2**20,
            configure_logging=True,
            logging_level="WARNING",
        )
        started = True
    try:
        yield ray.cluster_resources()
    finally:
        if started:
            ray.shutdown()
