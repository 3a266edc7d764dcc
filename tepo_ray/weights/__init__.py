"""Weight transports: how a new policy version gets from the learner to generators and scorers.

One module per transport behind a small factory (the shape of vLLM's
`distributed/weight_transfer/`):

* `collective` (default) — `tepo_ray.weights.collective`: a gloo (CPU) / NCCL
  (GPU) process group between the learner (rank 0) and every receiver; bounded
  buckets are broadcast, metadata goes over Ray. No file, no shared filesystem.
* `file` — `tepo_ray.weights.file`: a safetensors file per version, read back
  by path. Explicit opt-in (`weights.transport: file`) for single-node debugging.

Sender side (the learner): `make_transport(weights_cfg, weights_dir=...)`
returns an object with `describe(model, version=) -> WeightUpdate` and
`send(update, model_or_named_tensors)`. Receiver side (any process):
`receive(update)` is a context manager yielding (name, tensor) pairs in the
update's order. `WeightUpdate` (`tepo_ray.weights.update`) is the only thing
that crosses Ray; tensors never do. Group lifecycle: `tepo_ray.weights.group`.
"""

from __future__ import annotations

import contextlib
import enum
from pathlib import Path
from typing import Any, Iterator

import torch

from tepo_ray.weights import collective, file, group
from tepo_ray.weights.params import ParamMeta, iter_full_state, load_named_tensors, param_metadata
from tepo_ray.weights.update import WeightUpdate

__all__ = ["WeightTransportName", "WeightUpdate", "ParamMeta", "make_transport", "receive", "iter_full_state",
           "param_metadata", "load_named_tensors", "group", "registered_transports", "as_update"]


class WeightTransportName(str, enum.Enum):
    COLLECTIVE = "collective"
    FILE = "file"


_RECEIVERS = {WeightTransportName.COLLECTIVE.value: collective.receive, WeightTransportName.FILE.value: file.receive}


def registered_transports() -> list[str]:
    return sorted(_RECEIVERS)


def make_transport(weights_cfg: Any, *, weights_dir: str | Path, keep: int = 4) -> Any:
    """The sender for `weights_cfg.transport` (a `WeightTransportName` or str)."""
    name = getattr(weights_cfg.transport, "value", weights_cfg.transport)
    if name == WeightTransportName.COLLECTIVE.value:
        return collective.CollectiveTransport(bucket_bytes=int(float(weights_cfg.bucket_mb) * 2**20))
    if name == WeightTransportName.FILE.value:
        return file.FileTransport(weights_dir=weights_dir, keep=keep)
    raise ValueError(f"weights.transport={name!r} is unknown; expected one of {registered_transports()}")


@contextlib.contextmanager
def receive(update: "WeightUpdate | dict[str, Any]") -> Iterator[Iterator[tuple[str, torch.Tensor]]]:
    """(name, tensor) pairs of `update`, received by its transport (see each transport's contract)."""
    update = WeightUpdate.from_dict(update)
    fn = _RECEIVERS.get(update.kind)
    if fn is None:
        raise ValueError(f"weight update kind {update.kind!r} is unknown; expected one of {registered_transports()}")
    with fn(update) as it:
        yield it


def as_update(source: "str | Path | WeightUpdate | dict[str, Any]", *, version: int) -> WeightUpdate:
    """A `WeightUpdate` from what callers pass to `update_weights`: an update (or its dict), or a file path."""
    if isinstance(source, (str, Path)):
        return WeightUpdate(kind=WeightTransportName.FILE.value, version=int(version), path=str(source))
    update = WeightUpdate.from_dict(source)
    if update.version != int(version):
        raise ValueError(f"weight update is version {update.version}, the caller says {version}")
    return update
