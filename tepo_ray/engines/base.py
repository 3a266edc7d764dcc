"""Generation engine interface: token ids in, sampled token ids (+ behaviour log-probs) out.

Every engine (DESIGN.md section 2, "Engines") implements `Engine`:

* `generate(requests, temperature=, top_p=, stop_token_ids=, seed=)` samples a
  continuation of each request's prompt token ids. Token ids end to end: the
  engine never decodes and re-encodes text, so what the learner trains on is
  exactly what was sampled.
* A request stops at the first sampled token in `stop_token_ids` (the agent's
  closing tags when they are single tokens: `</python>`, `</search>`,
  `</answer>`), at the first token whose decoded text completes one of the
  `stop` strings (the tags of a stock tokenizer, several tokens each), or at
  the model's EOS; that token is the last element of `token_ids`, kept whole
  even when the stop string ends inside it (its remaining characters stay in
  the output; nothing is truncated or re-tokenised). Only generated text is
  searched for stop strings, never the prompt. Otherwise it
  stops after `max_tokens` tokens, or when prompt + generated reaches
  `engine.max_context` (finish reason `"length"` in both cases).
* `logprobs[t]` is `log π(token_t | h_t)` of the *unmodified* policy (temperature
  1, no top-p) whose weights are `version`: the behaviour log-prob the
  importance ratio needs. It is the quantity a teacher-forced forward of the
  same weights gives, whatever temperature / top-p the sample was drawn with.
* `update_weights(source, version=)` loads new weights in place, without
  restarting the engine; later calls sample from the new weights. `source` is
  a `tepo_ray.weights.WeightUpdate` (or its dict) from the learner's transport
  — `collective`: received bucket by bucket on the weight group the engine
  joined with `join_weight_group(info, rank=)`; `file`: read from its path — or
  a safetensors file path (shorthand for a `file` update).
* `weight_ranks` is how many ranks of the weight group the engine needs (1, or
  one per tensor-parallel worker of a vLLM engine: each receives full tensors).
* `sequence_logprobs(sequences)` is the teacher-forced log-prob of tokens[1:]
  under the current weights (used to check weight sync).

Engines register under a name (`register_engine("hf")`) and are built from
`EngineConfig` with `make_engine(cfg, model_path=...)`.
"""

from __future__ import annotations

import abc
import os
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

__all__ = [
    "FinishReason",
    "GenerationRequest",
    "GenerationOutput",
    "Engine",
    "register_engine",
    "make_engine",
    "registered_engines",
    "finish_output",
]

FinishReason = Literal["stop", "length", "eos"]


@dataclass
class GenerationRequest:
    """One prompt to continue. `max_tokens` bounds the newly generated tokens."""

    prompt_ids: list[int]
    max_tokens: int
    request_id: str = ""


@dataclass
class GenerationOutput:
    """Newly generated tokens of one request (prompt excluded, padding stripped).

    `finish_reason`: "stop" (a caller stop token or stop string), "eos" (the model's
    EOS) or "length" (`max_tokens` or the context limit). For "stop" and "eos",
    `stop_token == token_ids[-1]`; for "length" it is None. `stop_str` names the
    stop string that ended the request (None when a token id or EOS did).
    `logprobs[t]` (when available): behaviour log-prob of `token_ids[t]`, len == len(token_ids).
    """

    token_ids: list[int]
    finish_reason: FinishReason
    stop_token: int | None = None
    logprobs: list[float] | None = None
    request_id: str = ""
    stop_str: str | None = None


class Engine(abc.ABC):
    """A policy that samples token ids and can swap its weights in place."""

    name: str = ""

    def __init__(self, engine_cfg: Any, *, model_path: str) -> None:
        self.cfg = engine_cfg
        self.model_path = str(model_path)
        self._version = 0

    # ------------------------------------------------------------------ interface
    @abc.abstractmethod
    def generate(
        self,
        requests: Sequence[GenerationRequest],
        *,
        temperature: float,
        top_p: float,
        stop_token_ids: Sequence[int],
        seed: int | None = None,
        stop: Sequence[str] = (),
    ) -> list[GenerationOutput]:
        """Sample one continuation per request, outputs in request order.

        `temperature == 0` is greedy. With `seed` set, the same call on the same
        weights returns the same tokens.
        """

    @abc.abstractmethod
    def update_weights(self, source: Any, *, version: int) -> None:
        """Load a `WeightUpdate` (or a safetensors file path) into the running engine; `self.version = version`."""

    @abc.abstractmethod
    def join_weight_group(self, info: Any, *, rank: int) -> None:
        """Join the learner's weight group (`tepo_ray.weights.group.GroupInfo`) as ranks rank..rank+weight_ranks-1.

        Blocks until every member has joined (the driver calls all members at once)."""

    @property
    def weight_ranks(self) -> int:
        """Ranks this engine occupies in the weight group."""
        return 1

    @abc.abstractmethod
    def sequence_logprobs(self, sequences: Sequence[Sequence[int]]) -> list[list[float]]:
        """Teacher-forced `log π(s[t] | s[:t])` for t = 1..len(s)-1, per sequence, current weights."""

    @abc.abstractmethod
    def shutdown(self) -> None:
        """Release the engine (idempotent). Call before interpreter exit."""

    @property
    @abc.abstractmethod
    def eos_token_ids(self) -> list[int]:
        """Token ids that end a sequence on their own (the model's EOS)."""

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of token ids the model scores (valid ids are 0..vocab_size-1)."""

    @property
    def version(self) -> int:
        """Policy version of the weights currently loaded (0 = the initial checkpoint)."""
        return self._version

    def ready(self) -> bool:
        return True

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ------------------------------------------------------------------ shared checks
    def _check_sampling(self, *, temperature: float, top_p: float, stop_token_ids: Sequence[int],
                        stop: Sequence[str] = ()) -> None:
        if isinstance(stop, str) or not all(isinstance(x, str) and x for x in stop):
            raise ValueError(f"stop={stop!r} is invalid; expected a list of non-empty strings")
        if not temperature >= 0:
            raise ValueError(f"temperature={temperature!r} is invalid; expected >= 0 (0 = greedy)")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p={top_p!r} is invalid; expected in (0, 1]")
        for t in stop_token_ids:
            if not isinstance(t, int) or not 0 <= t < self.vocab_size:
                raise ValueError(f"stop_token_ids contains {t!r}; expected token ids in [0, {self.vocab_size})")

    def _budgets(self, requests: Sequence[GenerationRequest]) -> list[int]:
        """Per-request token budget: min(max_tokens, max_context - len(prompt)); validates every request."""
        max_context = int(self.cfg.max_context)
        out = []
        for i, r in enumerate(requests):
            where = f"requests[{i}]"
            rid = f" (request_id={r.request_id!r})" if r.request_id else ""
            if not r.prompt_ids:
                raise ValueError(f"{where}.prompt_ids is empty{rid}; expected at least one token id")
            if not isinstance(r.max_tokens, int) or r.max_tokens < 1:
                raise ValueError(f"{where}.max_tokens={r.max_tokens!r}{rid} is invalid; expected an int >= 1")
            bad = next((t for t in r.prompt_ids if not isinstance(t, int) or not 0 <= t < self.vocab_size), None)
            if bad is not None:
                raise ValueError(f"{where}.prompt_ids contains {bad!r}{rid}; expected token ids in "
                                 f"[0, {self.vocab_size})")
            room = max_context - len(r.prompt_ids)
            if room < 1:
                raise ValueError(
                    f"{where}{rid} has a {len(r.prompt_ids)}-token prompt, which leaves no room under "
                    f"engine.max_context={max_context}; end the trajectory (finish 'max_context') before calling"
                )
            out.append(min(r.max_tokens, room))
        return out

    def _check_sequences(self, sequences: Sequence[Sequence[int]], *, max_len: int) -> None:
        for i, s in enumerate(sequences):
            if len(s) < 1:
                raise ValueError(f"sequences[{i}] is empty; expected at least one token id")
            if len(s) > max_len:
                raise ValueError(f"sequences[{i}] has {len(s)} tokens; this engine scores at most {max_len} "
                                 f"(engine.max_context)")
            bad = next((t for t in s if not isinstance(t, int) or not 0 <= t < self.vocab_size), None)
            if bad is not None:
                raise ValueError(f"sequences[{i}] contains {bad!r}; expected token ids in [0, {self.vocab_size})")

    def _weight_update(self, source: Any, *, version: int) -> Any:
        """`source` as a `WeightUpdate`; a file path must exist."""
        from tepo_ray.weights import as_update

        update = as_update(source, version=version)
        if update.kind == "file":
            if not os.path.isfile(update.path or ""):
                raise FileNotFoundError(
                    f"weight file {update.path!r} does not exist (expected a safetensors file from the learner)")
            update.path = os.path.abspath(update.path or "")
        return update


def finish_output(
    token_ids: Sequence[int],
    *,
    stop_ids: set[int],
    eos_ids: set[int],
    logprobs: Sequence[float] | None,
    request_id: str = "",
    text_stop: str | None = None,
) -> GenerationOutput:
    """Cut `token_ids` after the first stop/EOS token and name why generation ended.

    EOS wins the name "eos" even when it is also a caller stop token; any
    other stop token is "stop"; no stop token means the budget ran out ("length"),
    unless `text_stop` says the engine already cut `token_ids` at the token that
    completed that stop string ("stop", `stop_str=text_stop`).
    """
    ids = [int(t) for t in token_ids]
    lps = None if logprobs is None else [float(x) for x in logprobs]
    for j, t in enumerate(ids):
        if t in eos_ids or t in stop_ids:
            ids = ids[: j + 1]
            lps = None if lps is None else lps[: j + 1]
            return GenerationOutput(ids, "eos" if t in eos_ids else "stop", t, lps, request_id)
    if text_stop is not None and ids:
        return GenerationOutput(ids, "stop", ids[-1], lps, request_id, stop_str=text_stop)
    return GenerationOutput(ids, "length", None, lps, request_id)


# --------------------------------------------------------------------------- registry
_ENGINES: dict[str, type[Engine]] = {}


def register_engine(name: str) -> Callable[[type[Engine]], type[Engine]]:
    """Class decorator: make an `Engine` subclass buildable as `engine.name=<name>`."""

    def deco(cls: type[Engine]) -> type[Engine]:
        if not (isinstance(cls, type) and issubclass(cls, Engine)):
            raise TypeError(f"register_engine({name!r}) decorates {cls!r}; expected an Engine subclass")
        if name in _ENGINES and _ENGINES[name] is not cls:
            raise ValueError(f"engine name {name!r} is already registered to {_ENGINES[name].__qualname__}")
        cls.name = name
        _ENGINES[name] = cls
        return cls

    return deco


def registered_engines() -> list[str]:
    return sorted(_ENGINES)


def make_engine(engine_cfg: Any, *, model_path: str, **kwargs: Any) -> Engine:
    """Build the engine named by `engine_cfg.name` (an `EngineName` or str); extra kwargs go to its constructor."""
    name = engine_cfg.name
    name = getattr(name, "value", name)
    cls = _ENGINES.get(str(name))
    if cls is None:
        raise ValueError(f"engine.name={name!r} is unknown; expected one of {registered_engines()}")
    return cls(engine_cfg, model_path=model_path, **kwargs)
