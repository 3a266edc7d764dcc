"""One torch.distributed process group across the learner actors.

Contract:
* `rendezvous()` runs on the rank-0 actor's node (the driver schedules it into
  rank 0's bundle) and returns (node ip, a free TCP port) for the tcp:// init.
* `init_process_group(rank=, world_size=, master_addr=, master_port=, device=)`
  is called once by every rank with the same address; the backend is gloo for
  CPU and nccl for CUDA (`backend_for`). It blocks until all ranks joined (or
  `timeout_s`). A world of 1 still forms a group (FSDP2 needs one).
* `rank()` / `world_size()` are 0 / 1 when no group exists, so plain
  single-process code paths need no special case.
"""

from __future__ import annotations

import datetime
import socket

import torch
import torch.distributed as dist

__all__ = ["rendezvous", "free_port", "backend_for", "init_process_group", "rank", "world_size", "is_initialized",
           "destroy"]


def free_port() -> int:
    """A TCP port that was free a moment ago on this host."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def rendezvous() -> tuple[str, int]:
    """(this node's IP, a free port): the tcp:// address rank 0 will listen on."""
    try:
        import ray

        ip = ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"
    except Exception:
        ip = "127.0.0.1"
    return ip, free_port()


def backend_for(device: str | torch.device) -> str:
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init_process_group(
    *, rank: int, world_size: int, master_addr: str, master_port: int, device: str = "cpu", timeout_s: float = 600.0
) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank}, world_size={world_size}: expected 0 <= rank < world_size")
    if dist.is_initialized():
        if dist.get_world_size() != world_size or dist.get_rank() != rank:
            raise RuntimeError(f"a process group (rank {dist.get_rank()} of {dist.get_world_size()}) already exists; "
                               f"cannot join as rank {rank} of {world_size}")
        return
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(torch.device(device).index or 0)
    dist.init_process_group(
        backend=backend_for(device),
        init_method=f"tcp://{master_addr}:{int(master_port)}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def destroy() -> None:
    if is_initialized():
        dist.destroy_process_group()
