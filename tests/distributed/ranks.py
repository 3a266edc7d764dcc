"""Run a function on N local ranks of a gloo process group (torch.multiprocessing spawn), no Ray.

`run_ranks(fn, world_size, *args)` calls `fn(rank, world_size, *args)` in each
spawned process after `init_process_group`; `fn` must be importable (module level).
"""

from __future__ import annotations

from typing import Any, Callable

import torch.multiprocessing as mp

from tepo_ray.distributed import process_group


def _entry(rank: int, world_size: int, port: int, fn: Callable[..., Any], args: tuple) -> None:
    import torch

    torch.set_num_threads(1)
    process_group.init_process_group(rank=rank, world_size=world_size, master_addr="127.0.0.1",
                                     master_port=port, timeout_s=120)
    try:
        fn(rank, world_size, *args)
    finally:
        process_group.destroy()


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any) -> None:
    mp.spawn(_entry, args=(world_size, process_group.free_port(), fn, args), nprocs=world_size, join=True)
