"""Memory plan per role (pure; no Ray, no GPU): does each actor fit its device before anything starts?

`plan_memory(cfg)` estimates, per role and per device, the bytes of weights,
gradients, optimizer state and activations (or vLLM's KV cache), and
`MemoryPlan.check()` refuses a plan that cannot fit, naming the key to change.

Model size comes from the model's `config.json` (the local `model.path`, or the
local Hugging Face cache for a hub id), from the tiny-model fields when
`model.path` is null, or, for a hub id with no local config, from
`model.num_params` plus the architecture fields of `model` (hidden_size,
num_layers, num_heads, num_kv_heads, intermediate_size, vocab_size), which are
cross-checked against `model.num_params`.

Estimates (b = bytes of `model.dtype`, P = parameters, L layers, H hidden,
I intermediate, V vocabulary, T = trainer.micro_batch_size × engine.max_context
tokens per micro-batch):

* learner — AdamW, FSDP-sharded over N = learner.replicas GPUs (one per rank): weights P·(b + 4 fp32 master when b < 4)/N plus one gathered layer
  (two with prefetch) in b; gradients P·b/N; optimizer 8·P/N (two fp32
  moments) — 16 bytes/param in all, DESIGN.md section 5; a frozen reference
  P·b/N when algo.kl_coef > 0. Activations assume per-layer activation
  checkpointing: the saved layer inputs T·H·L·b, one layer's working set
  T·(8H + 4I)·b, and fp32 logits of one chunk ×3 (algo.entropy_chunk_size·V·12).
* scorers — forward only on one device (no sharding): weights P·b, one layer's
  working set and the chunked logits.
* generators — vLLM with tensor parallelism over the role's GPUs: weights
  P·b/tp; the KV cache gets engine.gpu_memory_utilization × memory − weights −
  1 GiB of runtime overhead and must hold at least one engine.max_context
  sequence (2·L·kv_heads·head_dim·b per token); the table says how many
  full-length sequences of engine.max_num_seqs fit.
* tool pools — CPU only; not planned here.

A role with num_gpus = 0 runs on CPU: its estimate is printed but not checked.
A fractional num_gpus (< 1) gets that fraction of one GPU's memory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.table import Table

__all__ = ["ModelShape", "RoleMemory", "MemoryPlan", "model_shape", "plan_memory"]

GiB = 2**30
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_RUNTIME_OVERHEAD = 1 * GiB  # CUDA context, allocator slack, vLLM runtime


@dataclass(frozen=True)
class ModelShape:
    num_params: int
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    source: str  # where the numbers came from

    @property
    def layer_params(self) -> int:
        """Parameters of one decoder layer (attention + SwiGLU MLP + norms)."""
        h, kv = self.hidden_size, self.num_kv_heads * self.head_dim
        q = self.num_heads * self.head_dim
        return h * q + q + 2 * (h * kv + kv) + q * h + 3 * h * self.intermediate_size + 2 * h


def _arch_params(*, layers: int, hidden: int, inter: int, heads: int, kv_heads: int, head_dim: int, vocab: int,
                 tied: bool) -> int:
    shape = ModelShape(0, layers, hidden, inter, heads, kv_heads, head_dim, vocab, "")
    return layers * shape.layer_params + vocab * hidden * (1 if tied else 2) + hidden


def _read_hf_config(path: str) -> tuple[dict[str, Any], str] | None:
    p = Path(path).expanduser()
    if (p / "config.json").is_file():
        return json.loads((p / "config.json").read_text()), str(p / "config.json")
    try:  # a hub id already in the local HF cache (no network)
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(path, "config.json")
    except Exception:  # not a valid repo id, no cache
        return None
    if isinstance(cached, str):
        return json.loads(Path(cached).read_text()), cached
    return None


def model_shape(model_cfg: Any) -> ModelShape:
    """The policy's size and architecture (see module docstring for the sources, in order)."""
    from tepo_ray.config import ConfigError

    m = model_cfg
    found = _read_hf_config(m.path) if m.path else None
    if found is not None:
        c, src = found
        c = c.get("text_config", c)
        heads = int(c["num_attention_heads"])
        head_dim = int(c.get("head_dim") or c["hidden_size"] // heads)
        kw = dict(layers=int(c["num_hidden_layers"]), hidden=int(c["hidden_size"]),
                  inter=int(c["intermediate_size"]), heads=heads,
                  kv_heads=int(c.get("num_key_value_heads") or heads), head_dim=head_dim,
                  vocab=int(c["vocab_size"]))
        n = int(m.num_params or _arch_params(**kw, tied=bool(c.get("tie_word_embeddings", False))))
        return ModelShape(n, kw["layers"], kw["hidden"], kw["inter"], kw["heads"], kw["kv_heads"], head_dim,
                          kw["vocab"], src)
    kw = dict(layers=m.num_layers, hidden=m.hidden_size, inter=m.intermediate_size, heads=m.num_heads,
              kv_heads=m.num_kv_heads, head_dim=m.hidden_size // m.num_heads, vocab=m.vocab_size)
    counts = [_arch_params(**kw, tied=t) for t in (False, True)]
    if m.path is None:
        return ModelShape(counts[0], kw["layers"], kw["hidden"], kw["inter"], kw["heads"], kw["kv_heads"],
                          kw["head_dim"], kw["vocab"], "model.* (embedded tiny model)")
    if m.num_params is None:
        raise ConfigError(
            f"model.path={m.path!r} has no readable config.json here (not a local directory, not in the HF cache); "
            f"for the memory plan set model.num_params and the architecture fields model.hidden_size, "
            f"model.num_layers, model.num_heads, model.num_kv_heads, model.intermediate_size, model.vocab_size")
    if not any(abs(c - m.num_params) <= 0.15 * m.num_params for c in counts):
        raise ConfigError(
            f"model.num_params={m.num_params:,} but the architecture fields give {counts[0]:,} parameters "
            f"(model.hidden_size={m.hidden_size}, model.num_layers={m.num_layers}, model.intermediate_size="
            f"{m.intermediate_size}, model.vocab_size={m.vocab_size}); set them to the model's config.json values")
    return ModelShape(int(m.num_params), kw["layers"], kw["hidden"], kw["inter"], kw["heads"], kw["kv_heads"],
                      kw["head_dim"], kw["vocab"], "model.num_params + model.* architecture fields")


@dataclass(frozen=True)
class RoleMemory:
    role: str
    device: str  # "cuda" or "cpu"
    devices: float  # GPUs per replica (0 = CPU)
    dtype: str
    weights: float  # bytes per device
    grads: float
    optimizer: float
    activations: float  # activations, or vLLM's KV cache for generators
    activations_label: str
    limit: float | None  # bytes available per device (None: CPU, not checked)
    problem: str | None  # why it does not fit, naming the key to change

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations


@dataclass(frozen=True)
class MemoryPlan:
    shape: ModelShape
    roles: tuple[RoleMemory, ...]

    def problems(self) -> list[str]:
        return [r.problem for r in self.roles if r.problem]

    def check(self) -> None:
        """Raise ConfigError listing every role that cannot fit its device."""
        from tepo_ray.config import ConfigError

        problems = self.problems()
        if problems:
            raise ConfigError("the memory plan does not fit:\n  " + "\n  ".join(problems))

    def table(self) -> Table:
        s = self.shape
        t = Table(title=f"memory per device — {s.num_params / 1e9:.2f}B params, {s.num_layers} layers "
                        f"(from {s.source})")
        for col in ("role", "device", "dtype", "weights", "grads", "optimizer", "activations / KV", "total",
                    "limit", "fits"):
            t.add_column(col)
        for r in self.roles:
            dev = "cpu" if r.device == "cpu" else f"cuda ×{r.devices:g}"
            fits = "-" if r.limit is None else ("yes" if r.problem is None else "[red]NO[/red]")
            t.add_row(r.role, dev, r.dtype, _gb(r.weights), _gb(r.grads), _gb(r.optimizer),
                      f"{_gb(r.activations)} {r.activations_label}", _gb(r.total),
                      "-" if r.limit is None else _gb(r.limit), fits)
        return t


def _gb(x: float) -> str:
    return f"{x / GiB:.1f} GiB" if x >= 0.05 * GiB else f"{x / 2**20:.0f} MiB"


def _limit(cfg: Any, role: str) -> float | None:
    r = cfg.topology[role]
    if r.num_gpus <= 0:
        return None
    per_gpu = float(r.gpu_memory_gb or cfg.topology.gpu_memory_gb) * GiB
    return per_gpu * min(float(r.num_gpus), 1.0)


def plan_memory(cfg: Any) -> MemoryPlan:
    """Per-role, per-device memory estimate for `cfg` (formulas in the module docstring)."""
    s = model_shape(cfg.model)
    dtype = str(cfg.model.dtype)
    b = _DTYPE_BYTES[dtype]
    P = float(s.num_params)
    tokens = int(cfg.trainer.micro_batch_size) * int(cfg.engine.max_context)
    layer_work = tokens * (8 * s.hidden_size + 4 * s.intermediate_size) * b
    logits = int(cfg.algo.entropy_chunk_size) * s.vocab_size * 4 * 3
    roles: list[RoleMemory] = []

    # learner: FSDP-sharded AdamW over every learner GPU
    lr = cfg.topology.learner
    n = max(1.0, float(lr.replicas)) if lr.num_gpus > 0 else 1.0
    master = 4 if b < 4 else 0
    gathered = 2 * s.layer_params * b if n > 1 else 0
    ref = P * b / n if cfg.algo.kl_coef > 0 else 0.0
    weights = P * (b + master) / n + gathered + ref
    grads, opt = P * b / n, 8 * P / n
    acts = tokens * s.hidden_size * s.num_layers * b + layer_work + logits
    limit = _limit(cfg, "learner")
    problem = None
    if limit is not None and weights + grads + opt + acts + _RUNTIME_OVERHEAD > limit:
        static_per_param = b + master + b + 8
        free = limit - acts - _RUNTIME_OVERHEAD - gathered
        need = P * static_per_param / free if free > 0 else float("inf")
        if need != float("inf") and need > n:
            problem = (f"learner: {_gb(weights + grads + opt + acts)} per GPU > {_gb(limit)}; AdamW state "
                       f"({static_per_param} bytes/param) must be sharded over >= {int(need) + 1} GPUs: raise "
                       f"topology.learner.replicas (now {n:g} GPUs, one per rank)")
        else:
            problem = (f"learner: activations {_gb(acts)} for {tokens} tokens per micro-batch do not fit "
                       f"{_gb(limit)}; lower trainer.micro_batch_size (now {cfg.trainer.micro_batch_size}) or "
                       f"engine.max_context")
    roles.append(RoleMemory("learner", "cuda" if limit else "cpu", n if limit else 0, dtype, weights, grads, opt,
                            acts, "(ckpt)", limit, problem))

    # scorers: one forward on one device
    sr = cfg.topology.scorers
    if sr.replicas > 0:
        limit = _limit(cfg, "scorers")
        weights, acts = P * b, layer_work + logits
        problem = None
        if limit is not None and weights + acts + _RUNTIME_OVERHEAD > limit:
            key = ("topology.scorers.gpu_memory_gb (a bigger GPU) or model.dtype" if weights > limit
                   else f"trainer.micro_batch_size (now {cfg.trainer.micro_batch_size})")
            problem = f"scorers: {_gb(weights + acts)} per GPU > {_gb(limit)}; change {key}"
        roles.append(RoleMemory("scorers", "cuda" if limit else "cpu", float(sr.num_gpus), dtype, weights, 0.0,
                                0.0, acts, "(fwd)", limit, problem))

    # generators: vLLM, tensor parallel over the role's GPUs
    gr = cfg.topology.generators
    limit = _limit(cfg, "generators")
    tp = max(1.0, float(gr.num_gpus))
    weights = P * b / tp
    kv_token = 2 * s.num_layers * s.num_kv_heads * s.head_dim * b / tp
    seq_kv = kv_token * int(cfg.engine.max_context)
    want = seq_kv * int(cfg.engine.max_num_seqs)
    problem = None
    if limit is not None:
        budget = float(cfg.engine.gpu_memory_utilization) * limit
        kv = max(0.0, budget - weights - _RUNTIME_OVERHEAD)
        label = f"KV ({int(kv // seq_kv)}/{cfg.engine.max_num_seqs} full seqs)"
        if kv < seq_kv:
            key = ("topology.generators.num_gpus (tensor parallel)" if weights + _RUNTIME_OVERHEAD > budget
                   else "engine.max_context")
            problem = (f"generators: weights {_gb(weights)} leave {_gb(kv)} of KV cache under "
                       f"engine.gpu_memory_utilization={cfg.engine.gpu_memory_utilization} × {_gb(limit)}; one "
                       f"{cfg.engine.max_context}-token sequence needs {_gb(seq_kv)}: raise "
                       f"engine.gpu_memory_utilization or {key}")
    else:
        kv, label = want, "KV (all seqs)"
    roles.append(RoleMemory("generators", "cuda" if limit else "cpu", float(gr.num_gpus), dtype, weights, 0.0, 0.0,
                            kv, label, limit, problem))
    return MemoryPlan(s, tuple(roles))
