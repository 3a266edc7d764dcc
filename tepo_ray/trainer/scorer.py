"""Behaviour-version scoring: exact token entropies, old log-probs and ΔH per tool call.

Per-turn behaviour policy: a trajectory whose turns were sampled by different
weight versions (generators load new weights between turns; `Trajectory.versions`
records the version of every generated token) is scored with, for each token,
the weights of the version that sampled it: one teacher-forced forward of the
whole sequence per distinct version, keeping that version's positions. Neither
the importance ratio nor ΔH ever uses weights that did not sample the token.
The versions used are recorded in `meta["scored_versions"]` (and
`meta["spans_versions"]` when more than one). Writes, per token t (DESIGN.md
section 1):

* `entropies[t] = H_t = -Σ_v π(v|h_t) log π(v|h_t)` over the full vocabulary,
  exact and chunked (`tepo_ray.algo.token_logprobs_and_entropy`);
* `behaviour_logprobs[t] = log π_old(token_t | tokens_<t)`, the denominator of
  the importance ratio;

both 0.0 where loss_mask == 0. Then per tool call k, with segment r_{i,k} the
one that ends with call k (`segments[call.segment_index]`) and r_{i,k+1} the one
after its observation (`segments[call.segment_index + 1]`)::

    ΔH_k = mean H(r_{i,k+1}) - mean H(r_{i,k})       (first algo.entropy_window tokens of each)
    I_{i,k} = 1[ΔH_k < 0]

ΔH_k is undefined (None, I = False) when r_{i,k+1} does not exist, either
selection is empty, or call k is malformed. "mean H(r)" is over the segment's
reasoning tokens, chosen by `algo.entropy_span` (`entropy_positions`: the
`<think>` content by default; tags, tool arguments, observations and the answer
block excluded; see docs/algorithm.md for the fallback).

Sampling distribution: log-probs and entropies use `logits / temperature`
with the generators' `engine.temperature` (1 when sampling is greedy), so they
describe the distribution that sampled. `top_p` is *not* applied: the
nucleus-truncated distribution gives -inf log-probs to every token outside
the nucleus and its entropy depends on a per-step cut; like verl and OpenRLHF
we score the temperature-scaled full distribution, which is exact for
top_p = 1 and a (documented) approximation for top_p < 1.

Weights arrive through `tepo_ray.weights`: `receive_weights(update)` takes a
`collective` update (held in memory, the last `cache_size` versions) or a
`file` update (its path registered); the model directory is `initial_version`.
Received versions are held in host memory (the driver keeps `max_staleness + 2`:
for a 7B model in bf16 that is ~15 GB of RAM per version).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

import torch

from tepo_ray import algo
from tepo_ray.distributed.device import select_device
from tepo_ray.records import RecordError, Segment, Trajectory
from tepo_ray.trainer.batching import (
    check_first_token_untrained,
    make_token_batch,
    micro_batch_slices,
    token_logprobs,
)
from tepo_ray.trainer.checkpoint import load_policy, load_weights_into, weight_file_path
from tepo_ray.weights import WeightUpdate, load_named_tensors, receive

__all__ = ["EntropyScorer", "fill_delta_entropy", "entropy_positions", "ENTROPY_SPANS"]


ENTROPY_SPANS = ("think", "turn")


def entropy_positions(segment: Segment, *, span: str) -> tuple[list[int], str]:
    """Token positions of `segment` that enter its mean entropy, and which rule chose them.

    * ``span="think"``: the `<think>` content (`segment.reasoning_spans`); a segment with no
      `<think>` content falls back to its non-tag tokens (`nontag_spans`: free text, tool
      argument, answer) -> rule ``"nontag"``; a segment recorded without spans (older or
      hand-built records) uses every token -> rule ``"turn"``.
    * ``span="turn"``: every generated token of the turn, tags included.
    """
    if span not in ENTROPY_SPANS:
        raise ValueError(f"algo.entropy_span={span!r}; expected one of {ENTROPY_SPANS}")
    whole = list(range(segment.start, segment.end))
    if span == "turn" or segment.reasoning_spans is None:
        return whole, "turn"
    think = [t for a, b in segment.reasoning_spans for t in range(a, b)]
    if think:
        return think, "think"
    if segment.nontag_spans is None:
        return whole, "turn"
    return [t for a, b in segment.nontag_spans for t in range(a, b)], "nontag"


def fill_delta_entropy(traj: Trajectory, *, window: int | None, span: str = "think") -> list[float | None]:
    """Write ΔH_k / I_{i,k} into every tool call of `traj` from its `entropies`; return segment means.

    Each segment's mean is over `entropy_positions(segment, span=span)`, limited to its first
    `window` positions. A malformed call (`ToolCall.malformed`) gets ΔH None and I False: it
    never counts as entropy-decreasing. The rule used per segment is written to
    `traj.meta["entropy_span_rule"]`. Segment means are NaN -> None in the returned list (JSON-safe).
    """
    if traj.entropies is None:
        raise RecordError(f"trajectory {traj.uid}: entropies is None; score the trajectory first")
    if not traj.segments:
        for call in traj.tool_calls:
            call.delta_entropy, call.entropy_decreased = None, False
        return []
    chosen = [entropy_positions(s, span=span) for s in traj.segments]
    traj.meta["entropy_span_rule"] = [rule for _, rule in chosen]
    # Compact the chosen positions so each segment is one contiguous span of `picked`.
    flat = [t for pos, _ in chosen for t in pos]
    picked = torch.tensor(traj.entropies, dtype=torch.float32)[torch.tensor(flat, dtype=torch.long)]  # [P]
    bounds, offset = [], 0
    for pos, _ in chosen:
        bounds.append([offset, offset + len(pos)])
        offset += len(pos)
    spans = torch.tensor(bounds, dtype=torch.long).view(-1, 2)  # [K, 2]
    means = algo.segment_entropy(picked, spans, window=window)  # [K]
    deltas = algo.delta_entropy(means)  # [K-1]: deltas[j] = means[j+1] - means[j]
    decreased = algo.entropy_decreased(deltas)  # [K-1] bool, NaN -> False
    for call in traj.tool_calls:
        j = call.segment_index
        if not call.malformed and j + 1 < len(traj.segments) and not math.isnan(float(deltas[j])):
            call.delta_entropy = float(deltas[j])
            call.entropy_decreased = bool(decreased[j])
        else:
            call.delta_entropy, call.entropy_decreased = None, False
    return [None if math.isnan(m) else float(m) for m in means.tolist()]


class EntropyScorer:
    """Scores trajectories with the weights of the version that generated them.

    Weight versions are received in memory (`receive_weights` with a collective
    update; the last `cache_size` kept), or files `<weights_dir>/v{N}.safetensors`
    (what the learner publishes with the `file` transport) or paths registered with
    `register_weights` / `load_weights(path, version)`; the last `cache_size`
    registrations are remembered, and a version
    missing from them is looked up as `v{N}.safetensors` in `weights_dir` and next
    to every registered `v{M}.safetensors`, so a restarted scorer needs no state
    beyond its constructor arguments and one path. `initial_version` is the
    version of `model_path`.
    """

    def __init__(
        self,
        model_path: str | Path,
        *,
        algo_cfg: Any,
        device: str = "cpu",
        weights_dir: str | Path | None = None,
        initial_version: int = 0,
        cache_size: int = 8,
        micro_batch_size: int = 8,
        temperature: float = 1.0,
        dtype: str = "float32",
    ) -> None:
        if cache_size < 1:
            raise ValueError(f"cache_size must be >= 1, got {cache_size}")
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        self.model_path = str(model_path)
        self.window: int | None = algo_cfg.entropy_window
        self.span: str = str(getattr(algo_cfg, "entropy_span", "think"))
        self.chunk_size: int = int(algo_cfg.entropy_chunk_size)
        self.device = select_device(device)  # "auto": this Ray worker's GPU, else CPU
        self.weights_dir = Path(weights_dir) if weights_dir is not None else None
        self.cache_size = cache_size
        self.micro_batch_size = micro_batch_size
        self.temperature = float(temperature) if temperature > 0 else 1.0  # greedy sampling: score T = 1
        self.model = load_policy(self.model_path, device=self.device, dtype=dtype).eval()
        self.model.requires_grad_(False)
        self.vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
        self.pad_id = int(getattr(self.model.config, "pad_token_id", None) or 0)
        self._paths: OrderedDict[int, str] = OrderedDict({int(initial_version): self.model_path})
        self._states: OrderedDict[int, dict[str, torch.Tensor]] = OrderedDict()  # received in memory
        self.version = int(initial_version)
        self._loaded_path = self.model_path
        self.loads = 0  # weight switches performed (a metric: scoring order minimises them)
        self.last_score_time_s = 0.0
        self.total_score_time_s = 0.0  # cumulative busy time (driver derives idle fraction)

    # ------------------------------------------------------------------ weights
    def ready(self) -> dict[str, Any]:
        return {"version": self.version, "known_versions": self.known_versions()}

    def known_versions(self) -> list[int]:
        return sorted(set(self._paths) | set(self._states))

    def receive_weights(self, update: WeightUpdate | dict[str, Any]) -> int:
        """Receive a published version (collective: kept in memory; file: path registered); returns it.

        The model is not switched: scoring activates the version it needs."""
        update = WeightUpdate.from_dict(update)
        v = int(update.version)
        if update.kind == "file":
            self.register_weights(update.path or "", v)
            return v
        with receive(update) as named:
            # host memory: CPU tensors are views of the received buckets (never rewritten); GPU ones are
            # copied out, so the last cache_size versions cost host RAM, not accelerator memory
            state = {name: (t.to("cpu") if t.is_cuda else t) for name, t in named}
        for newer in [k for k in self._states if k > v]:  # versions only grow within one timeline: a
            del self._states[newer]  # newer cached one belongs to a timeline a learner restore discarded
        if self.version > v:
            self._loaded_path = ""
        self._states[v] = state
        self._states.move_to_end(v)
        while len(self._states) > self.cache_size:
            self._states.popitem(last=False)
        if v == self.version:  # a re-sent version replaces what is loaded
            self._loaded_path = ""
        return v

    def register_weights(self, path: str | Path, version: int) -> None:
        """Remember where version `version` lives without loading it."""
        self._paths[int(version)] = str(path)
        self._paths.move_to_end(int(version))
        while len(self._paths) > self.cache_size:
            self._paths.popitem(last=False)

    def load_weights(self, path: str | Path, version: int) -> int:
        """Register `path` as version `version` and switch the model to it now; returns the version."""
        if not Path(path).exists():
            raise FileNotFoundError(f"weight file {path} for version {version} does not exist")
        self.register_weights(path, version)
        self._activate(int(version), force=True)
        return self.version

    def _weight_dirs(self) -> list[Path]:
        """`weights_dir`, then the directories of registered `v{N}.safetensors` files (newest first)."""
        dirs = [self.weights_dir] if self.weights_dir is not None else []
        for v, p in reversed(self._paths.items()):
            path = Path(p)
            if path.name == weight_file_path(path.parent, v).name and path.parent not in dirs:
                dirs.append(path.parent)
        return dirs

    def _resolve(self, version: int) -> str:
        if version in self._paths and Path(self._paths[version]).exists():
            return self._paths[version]
        dirs = self._weight_dirs()
        for d in dirs:
            candidate = weight_file_path(d, version)
            if candidate.is_file():
                self.register_weights(candidate, version)
                return str(candidate)
        raise FileNotFoundError(
            f"no weights for behaviour version {version}: registered versions {self.known_versions()}, "
            f"no v{version}.safetensors in {[str(d) for d in dirs]}; call load_weights(path, version) before "
            f"scoring its trajectories (or raise the learner's keep_weight_versions above async.max_staleness)"
        )

    def _activate(self, version: int, *, force: bool = False) -> None:
        if version in self._states:
            key = f"<memory v{version}>"
            if version == self.version and self._loaded_path == key and not force:
                return
            load_named_tensors(self.model, iter(self._states[version].items()), what=f"weights v{version}")
            self.version, self._loaded_path = version, key
            self.loads += 1
            return
        path = self._resolve(version)
        if version == self.version and path == self._loaded_path and not force:
            return
        load_weights_into(self.model, path)
        self.version, self._loaded_path = version, path
        self.loads += 1

    # ------------------------------------------------------------------ scoring
    def _check(self, traj: Trajectory) -> None:
        if not isinstance(traj, Trajectory):
            raise TypeError(f"expected tepo_ray.records.Trajectory, got {type(traj).__name__}")
        traj.validate()
        check_first_token_untrained(traj.loss_mask, what=f"trajectory {traj.uid}")
        if traj.token_ids and (min(traj.token_ids) < 0 or max(traj.token_ids) >= self.vocab_size):
            raise RecordError(
                f"trajectory {traj.uid}: token_ids range [{min(traj.token_ids)}, {max(traj.token_ids)}] "
                f"outside the model vocabulary [0, {self.vocab_size})"
            )

    @torch.no_grad()
    def score(self, trajectories: Sequence[Trajectory]) -> list[Trajectory]:
        """Fill entropies, behaviour_logprobs and ΔH/I of every tool call; returns the same objects."""
        trajs = list(trajectories)
        for t in trajs:
            self._check(t)
        # version -> trajectories with tokens it sampled; every trajectory starts all-zero
        by_version: dict[int, list[int]] = {}
        for i, t in enumerate(trajs):
            t.entropies = [0.0] * len(t.token_ids)
            t.behaviour_logprobs = [0.0] * len(t.token_ids)
            for v in sorted({v for v, m in zip(t.versions, t.loss_mask) if m and v >= 0}):
                by_version.setdefault(v, []).append(i)
        # The loaded version first, then ascending: one weight switch per distinct version.
        order = sorted(by_version, key=lambda v: (v != self.version, v))
        t0 = time.perf_counter()
        for version in order:
            idxs = by_version[version]
            self._activate(version)
            # Length-sorted micro-batches waste less compute on padding.
            idxs = sorted(idxs, key=lambda i: len(trajs[i].token_ids))
            for sl in micro_batch_slices(len(idxs), self.micro_batch_size):
                mb = [trajs[i] for i in idxs[sl]]
                # train only the positions this version sampled: others stay for their own version
                masks = [[int(m and v == version) for m, v in zip(t.loss_mask, t.versions)] for t in mb]
                batch = make_token_batch([t.token_ids for t in mb], masks, pad_id=self.pad_id)
                lp, ent = token_logprobs(
                    self.model, batch, chunk_size=self.chunk_size, temperature=self.temperature, with_entropy=True
                )  # [b, T], [b, T]
                assert ent is not None
                lp, ent = lp.cpu(), ent.cpu()
                for row, (t, mask) in enumerate(zip(mb, masks)):
                    lp_row, ent_row = lp[row, : len(t.token_ids)].tolist(), ent[row, : len(t.token_ids)].tolist()
                    for pos in (p for p, m in enumerate(mask) if m):
                        t.behaviour_logprobs[pos] = lp_row[pos]
                        t.entropies[pos] = ent_row[pos]
        self.last_score_time_s = time.perf_counter() - t0
        self.total_score_time_s += self.last_score_time_s
        for t in trajs:
            gen_versions = sorted({v for v, m in zip(t.versions, t.loss_mask) if m})
            t.meta["scored_versions"] = gen_versions
            if len(gen_versions) > 1:
                t.meta["spans_versions"] = gen_versions
            t.meta["segment_entropy"] = fill_delta_entropy(t, window=self.window, span=self.span)
            t.validate()
        return trajs
