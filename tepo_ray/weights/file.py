"""`file` transport (explicit opt-in, single-node debugging): one safetensors file per version.

The learner writes `<weights_dir>/v{version}.safetensors` (atomically, the last
`keep` versions kept); receivers read the file by path. Across nodes this
needs a filesystem every receiver can read, which is why `collective` is the
default. Contract: `describe` names the file `send` writes; `receive(update)`
yields (name, tensor) read lazily from it.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterable, Iterator

import torch

from tepo_ray.weights.update import WeightUpdate

__all__ = ["FileTransport", "receive", "safetensors_names"]


def safetensors_names(path: str | Path) -> set[str]:
    """Tensor names in a safetensors file, or in every *.safetensors file of a model directory (headers only)."""
    from safetensors import safe_open

    path = Path(path)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path] if path.is_file() else []
    names: set[str] = set()
    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as h:
            names.update(h.keys())
    return names


class FileTransport:
    kind = "file"

    def __init__(self, *, weights_dir: str | Path, keep: int = 4) -> None:
        self.weights_dir = Path(weights_dir)
        self.keep = int(keep)

    def describe(self, model: torch.nn.Module, *, version: int, dtype: torch.dtype | None = None) -> WeightUpdate:
        from tepo_ray.trainer.checkpoint import weight_file_path

        return WeightUpdate(kind=self.kind, version=int(version), path=str(weight_file_path(self.weights_dir, version)))

    def send(self, update: WeightUpdate, named_tensors: Iterable[tuple[str, torch.Tensor]] | torch.nn.Module) -> int:
        from tepo_ray.trainer.checkpoint import publish_weights

        if not isinstance(named_tensors, torch.nn.Module):
            named_tensors = dict(named_tensors)  # type: ignore[assignment]
        path = publish_weights(named_tensors, weights_dir=self.weights_dir, version=update.version,  # type: ignore[arg-type]
                               keep=self.keep)
        return path.stat().st_size


@contextlib.contextmanager
def receive(update: WeightUpdate) -> Iterator[Iterator[tuple[str, torch.Tensor]]]:
    from safetensors import safe_open

    path = update.path or ""
    if not Path(path).is_file():
        raise FileNotFoundError(f"weight file {path!r} for version {update.version} does not exist "
                                f"(weights.transport=file needs a filesystem every receiver can read)")

    def it() -> Iterator[tuple[str, torch.Tensor]]:
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)

    yield it()
