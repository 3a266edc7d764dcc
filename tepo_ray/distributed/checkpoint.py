"""Sharded checkpoints with torch.distributed.checkpoint (DCP): atomic, reshardable.

Contract:
* `save_sharded_checkpoint(ckpt_dir, step=, model=, optimizer=, writers=, keep=)`
  is collective (every rank calls it). All ranks write their shards of the
  model and optimizer (`get_state_dict`: FQN keys = HF parameter names) into a
  staging dir `<ckpt_dir>/.tmp-dcp-step_N`; rank 0 then moves it into a
  checkpoint written by `trainer.checkpoint.save_checkpoint` (tmp dir, manifest,
  fsync, rename to `step_N`, `latest` pointer), adding its own `writers`
  (trainer state, scheduler, model config + tokenizer). A step is either
  complete under `step_N/` or absent; `load_latest` ignores anything else.
  Layout: `step_N/dcp/` (DCP files), `step_N/model_config/`, `*.pt`, `manifest.json`.
* `load_dcp(dcp_dir, model=, optimizer=None)` loads into a model sharded over
  any number of ranks (collective then), or into a plain model in a single
  process with no process group (export, eval): DCP reshards on load.
* the optimizer state is saved as FQN-keyed tensors, so it too reloads into a
  different world size.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from tepo_ray.distributed import process_group

__all__ = ["DCP_DIR", "MODEL_CONFIG_DIR", "is_sharded_checkpoint", "save_dcp", "load_dcp", "save_sharded_checkpoint"]

DCP_DIR = "dcp"
MODEL_CONFIG_DIR = "model_config"
_STAGING = ".tmp-dcp-step_"


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / DCP_DIR).is_dir()


def save_dcp(path: str | os.PathLike, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:
        state: dict[str, Any] = {"model": get_model_state_dict(model)}
    else:
        msd, osd = get_state_dict(model, optimizer)
        state = {"model": msd, "optim": osd}
    dcp.save(state, checkpoint_id=str(path))


def load_dcp(
    path: str | os.PathLike, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_state_dict,
    )

    path = Path(path)
    if not (path / ".metadata").is_file():
        raise FileNotFoundError(f"{path} is not a torch.distributed.checkpoint directory (no .metadata)")
    if optimizer is None:
        msd = get_model_state_dict(model)
        dcp.load({"model": msd}, checkpoint_id=str(path))
        set_model_state_dict(model, msd)
        return
    msd, osd = get_state_dict(model, optimizer)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def _barrier() -> None:
    if process_group.is_initialized():
        torch.distributed.barrier()


def save_sharded_checkpoint(
    ckpt_dir: str | os.PathLike,
    *,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    writers: Mapping[str, Callable[[Path], None]],
    keep: int,
    on_file_written: Callable[[str], None] | None = None,
) -> Path:
    from tepo_ray.trainer.checkpoint import save_checkpoint

    root = Path(ckpt_dir)
    staging = root / f"{_STAGING}{int(step)}"
    rank = process_group.rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(f"{_STAGING}*"):
            shutil.rmtree(stale, ignore_errors=True)
    _barrier()
    save_dcp(staging, model=model, optimizer=optimizer)
    _barrier()
    final = root / f"step_{int(step)}"
    if rank == 0:
        final = save_checkpoint(
            root, step=step, keep=keep, on_file_written=on_file_written,
            writers={DCP_DIR: lambda p: os.rename(staging, p), **writers},
        )
    _barrier()
    return final
