"""Records exchanged between processes (generation -> scoring -> learner).

Every record is a plain dataclass that round-trips through JSON without loss
(`to_dict` / `from_dict`, `write_jsonl` / `read_jsonl`). `validate()` checks the
invariants at actor boundaries and raises `RecordError` naming the field.

Token layout of a trajectory (DESIGN.md section 1)::

    [prompt ........][r_1 ... </python>][<result> obs </result>][r_2 ... </answer>]
     loss_mask = 0     loss_mask = 1      loss_mask = 0            loss_mask = 1

`segments[k]` is the token span [start, end) of reasoning segment r_{k+1}; the
segment that ends with tool call k has `tool_call_index == k`. The final
segment (after the last observation) has `tool_call_index is None`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

__all__ = [
    "RecordError",
    "ToolCall",
    "Segment",
    "Trajectory",
    "FINISH_REASONS",
    "write_jsonl",
    "read_jsonl",
]

# Why a trajectory ended. Every trajectory ends with exactly one of these.
FINISH_REASONS = (
    "answer",  # produced <answer>...</answer>
    "max_turns",  # hit the tool-call turn limit
    "max_new_tokens",  # hit the generated-token budget
    "max_context",  # prompt + generated + observations reached the context limit
    "eos",  # the model stopped (EOS) without an answer
    "malformed",  # output could not be parsed into an action (no answer)
    "error",  # engine failure while generating; reported, never silently dropped
)


class RecordError(ValueError):
    """A record violates an invariant; the message names the field."""


@dataclass
class ToolCall:
    """One tool invocation inside a trajectory."""

    tool: str  # "python" | "search"
    argument: str  # code or query, as parsed from the model's output
    observation: str = ""  # text shown to the model inside <result>...</result>
    error: str | None = None  # None on success; short reason otherwise (timeout, crash, ...)
    latency_s: float = 0.0
    segment_index: int = 0  # index into Trajectory.segments of the reasoning that ends with this call
    delta_entropy: float | None = None  # ΔH_k, filled by the entropy scorer (None: undefined)
    entropy_decreased: bool | None = None  # I_{i,k}

    @property
    def malformed(self) -> bool:
        """A call that could not run as written: unparseable, empty or unknown-tool (`tool == "invalid"`),
        or a tool this run has no pool for (`error == "unavailable"`). docs/algorithm.md says how
        such calls enter m/n and the dense rewards (`algo.malformed_calls`)."""
        return self.tool == "invalid" or self.error in ("malformed", "unavailable") or not self.argument.strip()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ToolCall":
        return cls(**d)


@dataclass
class Segment:
    """Token span [start, end) of one model-generated reasoning segment."""

    start: int
    end: int
    tool_call_index: int | None = None  # call that closes this segment; None for the final segment
    # Token spans [start, end) inside [start, end) recorded by the rollout from the sampled ids
    # (tepo_ray.agent.spans): `<think>` content, and every non-tag token. None: not recorded
    # (older records, hand-built ones): ΔH then uses the whole segment.
    reasoning_spans: list[list[int]] | None = None
    nontag_spans: list[list[int]] | None = None

    def __len__(self) -> int:
        return self.end - self.start

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Segment":
        return cls(**d)


@dataclass
class Trajectory:
    """One sampled trajectory (one member of a GRPO group)."""

    uid: str
    group_id: str
    prompt_id: str
    token_ids: list[int]
    loss_mask: list[int]  # 1 for model-generated tokens, 0 for prompt and observations
    versions: list[int]  # per-token behaviour policy version (-1 for prompt/observation tokens)
    prompt_len: int
    segments: list[Segment] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)
    answer: str | None = None
    finish_reason: str = "answer"
    gold: list[str] = field(default_factory=list)  # gold answers (aliases) for scoring
    task_type: str = "qa"  # "qa" (token F1) | "math" (equivalence)
    # Filled by the entropy scorer (behaviour-version teacher-forced forward):
    behaviour_logprobs: list[float] | None = None  # log pi_old(token_t), 0.0 where loss_mask == 0
    entropies: list[float] | None = None  # H_t, 0.0 where loss_mask == 0
    # Filled when rewards are computed:
    score: float | None = None  # F1 / EM / math equivalence
    reward: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    # ---- derived quantities -------------------------------------------------
    @property
    def behaviour_version(self) -> int:
        """Oldest policy version that generated any token (the one staleness is measured from)."""
        gen = [v for v, m in zip(self.versions, self.loss_mask) if m]
        return min(gen) if gen else -1

    @property
    def num_calls(self) -> int:
        return len(self.tool_calls)

    @property
    def num_generated(self) -> int:
        return int(sum(self.loss_mask))

    @property
    def num_decreasing(self) -> int:
        return sum(1 for c in self.tool_calls if c.entropy_decreased)

    # ---- validation & serialisation ----------------------------------------
    def validate(self) -> "Trajectory":
        n = len(self.token_ids)
        if len(self.loss_mask) != n:
            raise RecordError(f"trajectory {self.uid}: loss_mask has {len(self.loss_mask)} entries, token_ids {n}")
        if len(self.versions) != n:
            raise RecordError(f"trajectory {self.uid}: versions has {len(self.versions)} entries, token_ids {n}")
        if not 0 <= self.prompt_len <= n:
            raise RecordError(f"trajectory {self.uid}: prompt_len={self.prompt_len} outside [0, {n}]")
        if any(self.loss_mask[: self.prompt_len]):
            raise RecordError(f"trajectory {self.uid}: loss_mask must be 0 on prompt tokens")
        if any(m not in (0, 1) for m in self.loss_mask):
            raise RecordError(f"trajectory {self.uid}: loss_mask must hold only 0/1")
        if self.finish_reason not in FINISH_REASONS:
            raise RecordError(
                f"trajectory {self.uid}: finish_reason={self.finish_reason!r}; expected one of {FINISH_REASONS}"
            )
        prev_end = self.prompt_len
        for k, seg in enumerate(self.segments):
            if not (prev_end <= seg.start <= seg.end <= n):
                raise RecordError(
                    f"trajectory {self.uid}: segments[{k}]=[{seg.start},{seg.end}) not ordered inside [{prev_end},{n}]"
                )
            if any(m == 0 for m in self.loss_mask[seg.start : seg.end]):
                raise RecordError(f"trajectory {self.uid}: segments[{k}] covers tokens with loss_mask 0")
            for name in ("reasoning_spans", "nontag_spans"):
                for a, b in getattr(seg, name) or []:
                    if not seg.start <= a < b <= seg.end:
                        raise RecordError(
                            f"trajectory {self.uid}: segments[{k}].{name} span [{a},{b}) not a non-empty span "
                            f"inside the segment [{seg.start},{seg.end})"
                        )
            prev_end = seg.end
        for k, call in enumerate(self.tool_calls):
            if not 0 <= call.segment_index < len(self.segments):
                raise RecordError(f"trajectory {self.uid}: tool_calls[{k}].segment_index={call.segment_index} out of range")
            if self.segments[call.segment_index].tool_call_index != k:
                raise RecordError(f"trajectory {self.uid}: segments[{call.segment_index}] does not point back to tool_calls[{k}]")
        for name in ("behaviour_logprobs", "entropies"):
            vals = getattr(self, name)
            if vals is not None:
                if len(vals) != n:
                    raise RecordError(f"trajectory {self.uid}: {name} has {len(vals)} entries, token_ids {n}")
                if any(not math.isfinite(v) for v in vals):
                    raise RecordError(f"trajectory {self.uid}: {name} holds a non-finite value")
        return self

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Trajectory":
        d = dict(d)
        d["segments"] = [Segment.from_dict(s) for s in d.get("segments", [])]
        d["tool_calls"] = [ToolCall.from_dict(c) for c in d.get("tool_calls", [])]
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise RecordError(f"unknown trajectory field(s) {sorted(unknown)}; expected {sorted(known)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, allow_nan=False)

    @classmethod
    def from_json(cls, line: str) -> "Trajectory":
        return cls.from_dict(json.loads(line))


def write_jsonl(path: str | Path, trajectories: Iterable[Trajectory]) -> int:
    """Append trajectories to a JSONL file; returns how many were written."""
    count = 0
    with open(path, "a", encoding="utf-8") as fh:
        for t in trajectories:
            fh.write(t.to_json() + "\n")
            count += 1
    return count


def read_jsonl(path: str | Path) -> Iterator[Trajectory]:
    """Read trajectories back; a bad line raises RecordError naming file and line."""
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield Trajectory.from_json(line)
            except (json.JSONDecodeError, TypeError, RecordError) as exc:
                raise RecordError(f"{path}:{lineno}: not a trajectory record ({exc})") from exc
