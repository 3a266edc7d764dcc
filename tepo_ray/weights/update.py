"""`WeightUpdate`: the small, picklable description of one published weight version.

It is what crosses process boundaries (Ray calls, vLLM `collective_rpc`
arguments) instead of tensors: the transport kind, the version, and either a
file path (`file`) or the process group's name plus the ordered parameter
metadata and bucket budget (`collective`), from which both sides derive the
same bucket plan. `to_dict()` holds only str/int/list values, so any
serializer (Ray's, vLLM's msgspec) carries it unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tepo_ray.weights.params import ParamMeta

__all__ = ["WeightUpdate"]


@dataclass
class WeightUpdate:
    kind: str  # "collective" | "file"
    version: int
    path: str | None = None  # file: the safetensors file
    group: str | None = None  # collective: name of the process group the sender broadcasts on
    params: list[ParamMeta] = field(default_factory=list)  # collective: every tensor, in send order
    bucket_bytes: int = 0  # collective: byte budget of one broadcast

    def __post_init__(self) -> None:
        if self.kind == "file" and not self.path:
            raise ValueError("a file WeightUpdate needs path")
        if self.kind == "collective" and (not self.group or not self.params or self.bucket_bytes < 1):
            raise ValueError("a collective WeightUpdate needs group, params and bucket_bytes >= 1")
        if self.kind not in ("file", "collective"):
            raise ValueError(f"WeightUpdate.kind={self.kind!r} is unknown; expected 'collective' or 'file'")

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.params)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "version": int(self.version), "path": self.path, "group": self.group,
                "params": [p.to_list() for p in self.params], "bucket_bytes": int(self.bucket_bytes)}

    @classmethod
    def from_dict(cls, d: "dict[str, Any] | WeightUpdate") -> "WeightUpdate":
        if isinstance(d, WeightUpdate):
            return d
        return cls(kind=d["kind"], version=int(d["version"]), path=d.get("path"), group=d.get("group"),
                   params=[ParamMeta.from_list(p) for p in d.get("params") or []],
                   bucket_bytes=int(d.get("bucket_bytes") or 0))
