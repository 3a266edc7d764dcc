"""Structured configuration (omegaconf dataclass schemas).

`load_config(paths, overrides)` composes YAML files left to right, applies
dotlist overrides (`algo.mode=dense algo.alpha=0.5`) and returns a validated,
struct-mode `DictConfig`: an unknown key fails with the closest valid key, a
wrong type or out-of-range value fails naming the dotted field, the value and
what is allowed. Resource checks against a live cluster live in
`validate_resources` (they need a cluster; static checks do not).

Each actor receives only its own sub-config (`cfg.engine`, `cfg.tools.python`, ...).
"""

from __future__ import annotations

import difflib
import enum
import re
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

__all__ = [
    "ConfigError",
    "AlgoMode",
    "EngineName",
    "PlacementStrategy",
    "WeightTransport",
    "TepoConfig",
    "load_config",
    "to_yaml",
    "save_resolved",
    "validate_resources",
]


class ConfigError(ValueError):
    """A configuration problem, with the dotted key and the fix in the message."""


class AlgoMode(str, enum.Enum):
    GRPO = "grpo"
    SPARSE = "sparse"
    DENSE = "dense"


class EngineName(str, enum.Enum):
    HF = "hf"
    VLLM = "vllm"


class WeightTransport(str, enum.Enum):
    COLLECTIVE = "collective"  # gloo (CPU) / NCCL (GPU) broadcast from the learner; no shared filesystem
    FILE = "file"  # a safetensors file per version read back by path (single-node debugging)


class PlacementStrategy(str, enum.Enum):
    PACK = "PACK"
    SPREAD = "SPREAD"
    STRICT_PACK = "STRICT_PACK"
    STRICT_SPREAD = "STRICT_SPREAD"


# --------------------------------------------------------------------------- schemas
@dataclass
class ModelConfig:
    """Policy model. `path: null` builds the embedded tiny Qwen2 into `cache_dir`."""

    path: Optional[str] = None  # HF model dir (or hub id on machines that can reach a hub)
    cache_dir: str = ".cache/tepo_ray"
    # Tiny-model architecture (used only when path is null).
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 512
    max_position_embeddings: int = 1024
    vocab_size: int = 512  # BPE vocabulary trained on the task corpus
    dtype: str = "float32"  # float32 | bfloat16 | float16
    seed: int = 0
    # Parameter count for `tepo-ray topology`'s memory plan when model.path has no readable config.json (a hub
    # id not in the local HF cache); then the architecture fields above must be the model's too.
    num_params: Optional[int] = None

    def __post_init__(self) -> None:
        _check(self.num_params is None or self.num_params > 0, "model.num_params", self.num_params, "null or > 0")
        _check(self.hidden_size > 0, "model.hidden_size", self.hidden_size, "> 0")
        _check(self.num_layers > 0, "model.num_layers", self.num_layers, "> 0")
        _check(self.num_heads > 0, "model.num_heads", self.num_heads, "> 0")
        _check(
            self.hidden_size % self.num_heads == 0,
            "model.hidden_size",
            self.hidden_size,
            f"a multiple of model.num_heads={self.num_heads}",
        )
        _check(
            self.num_heads % max(self.num_kv_heads, 1) == 0 and self.num_kv_heads > 0,
            "model.num_kv_heads",
            self.num_kv_heads,
            f"> 0 and dividing model.num_heads={self.num_heads}",
        )
        _check(self.dtype in ("float32", "bfloat16", "float16"), "model.dtype", self.dtype, "float32|bfloat16|float16")
        _check(self.vocab_size >= 64, "model.vocab_size", self.vocab_size, ">= 64")


@dataclass
class JsonlFieldsConfig:
    """Field names for `data.format=jsonl` (any jsonl); dotted names reach nested fields."""

    question: str = "question"
    answers: str = "answers"  # a string or a list of strings (aliases)
    id: Optional[str] = None  # null: <file stem>-<n>
    task_type: str = "qa"  # qa | math: the task kind of every item

    def __post_init__(self) -> None:
        _check(self.task_type in ("qa", "math"), "data.jsonl_fields.task_type", self.task_type, "qa|math")


@dataclass
class DataConfig:
    """Prompts for RL / evaluation and demonstrations for SFT."""

    task: str = "mixed"  # arithmetic | multihop | mixed | jsonl
    train_path: Optional[str] = None  # a data file when task=jsonl, read with `format`
    eval_path: Optional[str] = None
    # Loader of train_path / eval_path (tepo_ray.data.loaders): tasks (this project's jsonl) | hotpotqa |
    # 2wikimultihopqa | musique | bamboogle | aime | math500 | gsm8k | gaia | jsonl (mapped by jsonl_fields).
    format: str = "tasks"
    jsonl_fields: JsonlFieldsConfig = field(default_factory=JsonlFieldsConfig)
    corpus_path: Optional[str] = None  # wiki-18 style jsonl; generated when null
    # SFT demonstrations as chat-message jsonl ({"messages": [{"role", "content"}, ...]} per line; tool messages
    # are observations, loss-masked). Needed for SFT when model.path is set; null = built-in tiny-model demos.
    sft_path: Optional[str] = None
    num_train: int = 512
    num_eval: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self.task in ("arithmetic", "multihop", "mixed", "jsonl"), "data.task", self.task,
               "arithmetic|multihop|mixed|jsonl")
        _check(self.num_train > 0, "data.num_train", self.num_train, "> 0")
        _check(self.num_eval >= 0, "data.num_eval", self.num_eval, ">= 0")
        from tepo_ray.data.loaders import loader_names

        _check(self.format in loader_names(), "data.format", self.format, "|".join(loader_names()))


@dataclass
class PromptConfig:
    """How prompts are built (tepo_ray.agent.prompts)."""

    # System prompt file (tools + tag protocol) for chat-template prompts; relative paths are looked up in the
    # current directory, then the project root. null = experiments/prompts/agent_system.txt.
    system_prompt_path: Optional[str] = None
    use_chat_template: str = "auto"  # auto (when the tokenizer has one) | true | false (plain "Question: …")

    def __post_init__(self) -> None:
        self.use_chat_template = str(self.use_chat_template).lower()
        _check(self.use_chat_template in ("auto", "true", "false"), "prompt.use_chat_template",
               self.use_chat_template, "auto|true|false")


@dataclass
class EngineConfig:
    """Generation engine and sampling limits (per GenerationActor)."""

    name: EngineName = EngineName.HF
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256  # generated-token budget per trajectory (all turns)
    max_turn_tokens: int = 128  # tokens per generation turn
    max_turns: int = 4  # tool calls per trajectory
    max_context: int = 768  # prompt + generated + observation tokens
    max_num_seqs: int = 64  # concurrent sequences per engine step (vLLM)
    gpu_memory_utilization: float = 0.5
    enforce_eager: bool = True
    seed: int = 0
    # vLLM knobs (ignored by the hf engine, which supports tensor_parallel_size=1 only)
    tensor_parallel_size: int = 1  # GPUs per generator; > 1 runs vLLM's Ray executor on one bundle per TP rank
    enable_prefix_caching: bool = True
    attention_backend: Optional[str] = None  # e.g. FLASH_ATTN | FLASHINFER | TRITON_ATTN; null = vLLM's choice
    max_num_batched_tokens: Optional[int] = None  # null = vLLM's default

    def __post_init__(self) -> None:
        _check(self.temperature >= 0, "engine.temperature", self.temperature, ">= 0")
        _check(0 < self.top_p <= 1, "engine.top_p", self.top_p, "in (0, 1]")
        _check(self.max_new_tokens > 0, "engine.max_new_tokens", self.max_new_tokens, "> 0")
        _check(self.max_turn_tokens > 0, "engine.max_turn_tokens", self.max_turn_tokens, "> 0")
        _check(self.max_turns >= 0, "engine.max_turns", self.max_turns, ">= 0")
        _check(self.max_context > 0, "engine.max_context", self.max_context, "> 0")
        _check(0 < self.gpu_memory_utilization <= 1, "engine.gpu_memory_utilization",
               self.gpu_memory_utilization, "in (0, 1]")
        _check(self.tensor_parallel_size >= 1, "engine.tensor_parallel_size", self.tensor_parallel_size, ">= 1")
        _check(self.max_num_batched_tokens is None or self.max_num_batched_tokens >= 1,
               "engine.max_num_batched_tokens", self.max_num_batched_tokens, "null or >= 1")


@dataclass
class RoleResources:
    """Resources for one actor role; one placement-group bundle per replica."""

    replicas: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    gpu_memory_gb: Optional[float] = None  # memory of one GPU of this role; null = topology.gpu_memory_gb

    def __post_init__(self) -> None:
        _check(self.gpu_memory_gb is None or self.gpu_memory_gb > 0, "topology.<role>.gpu_memory_gb",
               self.gpu_memory_gb, "null or > 0")
        _check(self.replicas >= 0, "topology.<role>.replicas", self.replicas, ">= 0")
        _check(self.num_cpus >= 0, "topology.<role>.num_cpus", self.num_cpus, ">= 0")
        _check(self.num_gpus >= 0, "topology.<role>.num_gpus", self.num_gpus, ">= 0")


@dataclass
class TopologyConfig:
    """One placement group: bundles for each role, in this order."""

    strategy: PlacementStrategy = PlacementStrategy.PACK
    generators: RoleResources = field(default_factory=lambda: RoleResources(replicas=1, num_cpus=0.5))
    scorers: RoleResources = field(default_factory=lambda: RoleResources(replicas=1, num_cpus=0.25))
    learner: RoleResources = field(default_factory=lambda: RoleResources(replicas=1, num_cpus=0.5))
    python_tools: RoleResources = field(default_factory=lambda: RoleResources(replicas=1, num_cpus=0.25))
    search_tools: RoleResources = field(default_factory=lambda: RoleResources(replicas=1, num_cpus=0.25))
    placement_timeout_s: float = 60.0
    gpu_memory_gb: float = 80.0  # memory of one GPU, for the memory plan of `tepo-ray topology`

    def __post_init__(self) -> None:
        _check(self.gpu_memory_gb > 0, "topology.gpu_memory_gb", self.gpu_memory_gb, "> 0")


@dataclass
class PythonToolConfig:
    workers: int = 2  # worker actors in the pool at start
    min_workers: int = 1
    max_workers: int = 4
    autoscale: bool = False
    call_timeout_s: float = 5.0  # wall-clock limit for one snippet
    cpu_time_s: int = 5
    memory_mb: int = 512
    max_processes: int = 16
    max_file_mb: int = 16
    max_open_files: int = 64
    max_output_chars: int = 2000  # stdout/stderr kept per call before "[truncated]"
    isolate_network: bool = True
    # How the network is blocked when isolate_network: auto | namespace | seccomp | audit
    # (tepo_ray.tools.python_sandbox.NetworkMode; auto = the first of namespace, seccomp, audit that works).
    network_mode: str = "auto"
    prestarted: int = 2  # warm sandbox processes per worker
    # Each snippet in its own PID namespace + /proc where the host allows it (root); PythonSandbox.ready() says.
    pid_namespace: bool = True

    def __post_init__(self) -> None:
        _check(self.network_mode in ("auto", "namespace", "seccomp", "audit"), "tools.python.network_mode",
               self.network_mode, "auto|namespace|seccomp|audit (set isolate_network=false to allow network)")
        for name in ("cpu_time_s", "memory_mb", "max_processes", "max_file_mb", "max_open_files",
                     "max_output_chars"):
            _check(getattr(self, name) >= 1, f"tools.python.{name}", getattr(self, name), ">= 1")
        _check(self.prestarted >= 0, "tools.python.prestarted", self.prestarted, ">= 0")


@dataclass
class SearchToolConfig:
    workers: int = 1
    min_workers: int = 1
    max_workers: int = 4
    autoscale: bool = False
    call_timeout_s: float = 5.0
    backend: str = "bm25"  # bm25 | chroma | faiss (docs/search.md: which at which corpus size)
    index_dir: Optional[str] = None  # built from data.corpus_path into the run cache when null
    embedding_model: Optional[str] = None  # local sentence-transformers dir for chroma / faiss
    top_k: int = 3
    max_doc_chars: int = 300
    # Retriever options: preload = page the (memory-mapped, shared) index in when a worker starts;
    # dense backends: the query encoder's device (cpu | cuda | cuda:N) and faiss's search knobs.
    preload: bool = False
    encoder_device: str = "cpu"
    faiss_nprobe: int = 32
    faiss_ef_search: int = 128
    faiss_use_gpu: bool = False
    # Name of a long-lived search service on the cluster (`tepo-ray tools serve CONFIG --name NAME`) that
    # every run sharing the index calls (the arms of a sweep): the run starts no search pool of its own and
    # reserves no search bundle. null = the run starts its own pool.
    service: Optional[str] = None

    def __post_init__(self) -> None:
        _check(self.service is None or bool(str(self.service).strip()), "tools.search.service", self.service,
               "null or a service name")
        _check(self.backend in ("bm25", "chroma", "faiss"), "tools.search.backend", self.backend,
               "bm25|chroma|faiss")
        _check(self.faiss_nprobe > 0, "tools.search.faiss_nprobe", self.faiss_nprobe, "> 0")
        _check(self.faiss_ef_search > 0, "tools.search.faiss_ef_search", self.faiss_ef_search, "> 0")
        _check(self.top_k > 0, "tools.search.top_k", self.top_k, "> 0")


@dataclass
class ToolsConfig:
    python: PythonToolConfig = field(default_factory=PythonToolConfig)
    search: SearchToolConfig = field(default_factory=SearchToolConfig)
    max_observation_chars: int = 400  # observation text shown to the model
    max_inflight_per_worker: int = 4

    def __post_init__(self) -> None:
        for name in ("python", "search"):
            t = getattr(self, name)
            _check(t.workers >= 0, f"tools.{name}.workers", t.workers, ">= 0")
            _check(t.min_workers >= 0, f"tools.{name}.min_workers", t.min_workers, ">= 0")
            _check(t.max_workers >= max(t.min_workers, 1), f"tools.{name}.max_workers", t.max_workers,
                   f">= tools.{name}.min_workers ({t.min_workers}) and >= 1")
            _check(t.call_timeout_s > 0, f"tools.{name}.call_timeout_s", t.call_timeout_s, "> 0")
            _check(t.workers <= t.max_workers, f"tools.{name}.workers", t.workers,
                   f"<= tools.{name}.max_workers ({t.max_workers}); raise max_workers or lower workers")
        _check(self.max_observation_chars > 0, "tools.max_observation_chars", self.max_observation_chars, "> 0")
        _check(self.max_inflight_per_worker >= 1, "tools.max_inflight_per_worker", self.max_inflight_per_worker,
               ">= 1")


@dataclass
class SparseRewardConfig:
    # Reward when a trajectory makes no tool call: "score" (= F1) or a number.
    no_tool_value: str = "score"


@dataclass
class AlgoConfig:
    mode: AlgoMode = AlgoMode.DENSE
    alpha: float = 0.5  # dense entropy bonus (paper sweeps 0.1, 0.5, 1.0)
    group_size: int = 4  # samples per prompt (G)
    entropy_window: Optional[int] = None  # first W tokens of each segment; null = whole segment
    # Tokens ΔH is measured on (docs/algorithm.md): think = the <think> content of each segment (fallback: its
    # non-tag tokens when it has no <think> content); turn = every generated token of the turn, tags included.
    entropy_span: str = "think"
    # Malformed tool calls (tool "invalid", empty call, unknown tool): exclude = not in m/n, no per-call reward;
    # penalize = in n but never in m, dense per-call reward 0 (docs/algorithm.md).
    malformed_calls: str = "exclude"
    entropy_chunk_size: int = 256  # tokens per chunk for exact full-vocab entropy
    adv_eps: float = 1e-6
    adv_std_normalize: bool = True
    clip_low: float = 0.2
    clip_high: float = 0.28
    kl_coef: float = 0.0
    lr: float = 1e-5
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    warmup_steps: int = 0
    loss_agg: str = "token_mean"
    policy_loss: str = "clipped"
    sparse: SparseRewardConfig = field(default_factory=SparseRewardConfig)

    def __post_init__(self) -> None:
        _check(self.alpha >= 0, "algo.alpha", self.alpha, ">= 0")
        _check(self.group_size >= 2, "algo.group_size", self.group_size, ">= 2 (GRPO needs a group)")
        _check(self.entropy_window is None or self.entropy_window > 0, "algo.entropy_window",
               self.entropy_window, "null or > 0")
        _check(self.entropy_span in ("think", "turn"), "algo.entropy_span", self.entropy_span, "think|turn")
        _check(self.malformed_calls in ("exclude", "penalize"), "algo.malformed_calls", self.malformed_calls,
               "exclude|penalize")
        _check(self.entropy_chunk_size > 0, "algo.entropy_chunk_size", self.entropy_chunk_size, "> 0")
        _check(self.clip_low > 0, "algo.clip_low", self.clip_low, "> 0")
        _check(self.clip_high > 0, "algo.clip_high", self.clip_high, "> 0")
        _check(self.kl_coef >= 0, "algo.kl_coef", self.kl_coef, ">= 0")
        _check(self.lr > 0, "algo.lr", self.lr, "> 0")
        _check(self.adv_eps > 0, "algo.adv_eps", self.adv_eps, "> 0")
        _check(self.max_grad_norm > 0, "algo.max_grad_norm", self.max_grad_norm, "> 0")
        _check(self.loss_agg in ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum"), "algo.loss_agg",
               self.loss_agg, "token_mean|seq_mean_token_mean|seq_mean_token_sum")
        nt = self.sparse.no_tool_value
        if nt != "score":
            try:
                float(nt)
            except (TypeError, ValueError):
                raise ConfigError(
                    f"algo.sparse.no_tool_value={nt!r} is invalid; expected 'score' or a number"
                ) from None


@dataclass
class AsyncConfig:
    max_staleness: int = 1  # 0 = exact synchronous GRPO
    max_inflight_groups: int = 8  # admission cap on groups being generated at once
    rollout_batch_groups: int = 2  # groups the learner consumes per step

    def __post_init__(self) -> None:
        _check(self.max_staleness >= 0, "async.max_staleness", self.max_staleness, ">= 0")
        _check(self.max_inflight_groups >= 1, "async.max_inflight_groups", self.max_inflight_groups, ">= 1")
        _check(self.rollout_batch_groups >= 1, "async.rollout_batch_groups", self.rollout_batch_groups, ">= 1")


@dataclass
class TrainerConfig:
    steps: int = 10
    micro_batch_size: int = 8
    checkpoint_dir: Optional[str] = None  # <run_dir>/checkpoints when null
    checkpoint_interval: int = 5
    keep_checkpoints: int = 2
    seed: int = 0
    eval_interval: int = 0  # 0 = no periodic eval
    # SFT stage
    sft_steps: int = 200
    sft_lr: float = 3e-3
    sft_batch_size: int = 32
    # recompute each decoder layer's activations in backward (less memory, ~1/3 more compute)
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        _check(self.steps >= 0, "trainer.steps", self.steps, ">= 0")
        _check(self.micro_batch_size >= 1, "trainer.micro_batch_size", self.micro_batch_size, ">= 1")
        _check(self.checkpoint_interval >= 0, "trainer.checkpoint_interval", self.checkpoint_interval, ">= 0")
        _check(self.keep_checkpoints >= 1, "trainer.keep_checkpoints", self.keep_checkpoints, ">= 1")


@dataclass
class LoggingConfig:
    run_dir: Optional[str] = None  # runs/<name>-<timestamp> when null
    name: str = "tepo"
    wandb_mode: str = "offline"  # offline | online | disabled
    wandb_project: str = "tepo-ray"
    wandb_group: Optional[str] = None
    progress: bool = True

    def __post_init__(self) -> None:
        _check(self.wandb_mode in ("offline", "online", "disabled"), "logging.wandb_mode", self.wandb_mode,
               "offline|online|disabled")


@dataclass
class WeightsConfig:
    """How new policy versions reach generators and scorers (`tepo_ray.weights`)."""

    transport: WeightTransport = WeightTransport.COLLECTIVE
    backend: str = "auto"  # collective backend: auto (nccl with CUDA, else gloo) | gloo | nccl
    bucket_mb: float = 256.0  # bytes per broadcast: peak extra memory per receiver ~ max(bucket, largest tensor)
    timeout_s: float = 600.0  # a collective that waits longer fails (a receiver died)

    def __post_init__(self) -> None:
        _check(self.backend in ("auto", "gloo", "nccl"), "weights.backend", self.backend, "auto|gloo|nccl")
        _check(self.bucket_mb > 0, "weights.bucket_mb", self.bucket_mb, "> 0")
        _check(self.timeout_s > 0, "weights.timeout_s", self.timeout_s, "> 0")


@dataclass
class PilotConfig:
    """`tepo-ray pilot`: is ΔH after a call lower for useful calls than for useless ones? (paper's pilot study)"""

    num_items: int = 64  # held-out items sampled (data.num_eval caps it)
    samples_per_item: int = 2  # trajectories per item
    temperature: float = 1.0  # sampling temperature of the policy
    inject_rate: float = 0.3  # share of tool calls whose observation is replaced by a useless one
    inject_kinds: list[str] = field(default_factory=lambda: ["irrelevant", "fail"])
    judge: str = "rule"  # rule | llm (OpenAI-compatible endpoint: judge_base_url + judge_model)
    judge_base_url: Optional[str] = None  # e.g. http://127.0.0.1:8000/v1 (a local `vllm serve`)
    judge_model: Optional[str] = None
    judge_api_key: str = "EMPTY"
    judge_timeout_s: float = 30.0
    confidence: float = 0.95
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self.num_items >= 1, "pilot.num_items", self.num_items, ">= 1")
        _check(self.samples_per_item >= 1, "pilot.samples_per_item", self.samples_per_item, ">= 1")
        _check(0.0 <= self.inject_rate <= 1.0, "pilot.inject_rate", self.inject_rate, "in [0, 1]")
        bad = [k for k in self.inject_kinds if k not in ("irrelevant", "fail")]
        _check(not bad and (self.inject_kinds or self.inject_rate == 0), "pilot.inject_kinds",
               list(self.inject_kinds), "a non-empty list of irrelevant|fail")
        _check(self.judge in ("rule", "llm"), "pilot.judge", self.judge, "rule|llm")
        if self.judge == "llm":
            _check(bool(self.judge_base_url), "pilot.judge_base_url", self.judge_base_url,
                   "an OpenAI-compatible endpoint URL when pilot.judge=llm")
            _check(bool(self.judge_model), "pilot.judge_model", self.judge_model,
                   "the endpoint's model name when pilot.judge=llm")
        _check(0.5 < self.confidence < 1.0, "pilot.confidence", self.confidence, "in (0.5, 1)")


@dataclass
class SweepConfig:
    """`tepo-ray sweep`: GRPO vs TEPO-sparse vs TEPO-dense (one per alpha) from one SFT checkpoint."""

    arms: list[str] = field(default_factory=lambda: ["grpo", "sparse", "dense"])  # algo modes
    alphas: list[float] = field(default_factory=lambda: [0.1, 0.5, 1.0])  # one dense arm per alpha
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    max_concurrent: int = 0  # arms trained at once; 0 = as many placement groups as the cluster fits
    eval_sft: bool = True  # evaluate the shared SFT checkpoint too (the reference row)
    arm: Optional[str] = None  # set by the sweep on each run's config: the arm's name (W&B config)
    eval_temperature: float = 0.0  # held-out eval: 0 = greedy; > 0 samples eval_samples per item
    eval_samples: int = 1

    def __post_init__(self) -> None:
        bad = [a for a in self.arms if a not in ("grpo", "sparse", "dense")]
        _check(bool(self.arms) and not bad, "sweep.arms", list(self.arms), "a non-empty list of grpo|sparse|dense")
        _check(bool(self.seeds), "sweep.seeds", list(self.seeds), "a non-empty list of ints")
        _check("dense" not in self.arms or bool(self.alphas), "sweep.alphas", list(self.alphas),
               "a non-empty list when sweep.arms has dense")
        _check(self.max_concurrent >= 0, "sweep.max_concurrent", self.max_concurrent, ">= 0")
        _check(self.eval_temperature >= 0, "sweep.eval_temperature", self.eval_temperature, ">= 0")
        _check(self.eval_samples >= 1, "sweep.eval_samples", self.eval_samples, ">= 1")


@dataclass
class TepoConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    topology: TopologyConfig = field(default_factory=TopologyConfig)
    tools: ToolsConfig = field(default_factory=ToolsConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    # `async` is a Python keyword: the YAML key is `async`, the attribute `async_`.
    async_: AsyncConfig = field(default_factory=AsyncConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    weights: WeightsConfig = field(default_factory=WeightsConfig)
    pilot: PilotConfig = field(default_factory=PilotConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)

    def __post_init__(self) -> None:
        tp = self.engine.tensor_parallel_size
        if tp > 1:
            name = getattr(self.engine.name, "value", self.engine.name)
            _check(name == "vllm", "engine.tensor_parallel_size", tp, f"1 with engine.name={name} (TP needs vllm)")
            _check(self.topology.generators.num_gpus == tp, "topology.generators.num_gpus",
                   self.topology.generators.num_gpus,
                   f"== engine.tensor_parallel_size ({tp}): one GPU per TP rank of each generator")
        _check(
            self.engine.max_new_tokens <= self.engine.max_context,
            "engine.max_new_tokens",
            self.engine.max_new_tokens,
            f"<= engine.max_context ({self.engine.max_context})",
        )
        _check(
            self.engine.max_turn_tokens <= self.engine.max_context,
            "engine.max_turn_tokens",
            self.engine.max_turn_tokens,
            f"<= engine.max_context ({self.engine.max_context})",
        )


# --------------------------------------------------------------------------- helpers
def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid; expected {allowed}")


def _rename_async(tree: Any, *, to_attr: bool) -> Any:
    """YAML uses `async:`; the dataclass field is `async_`."""
    if isinstance(tree, dict):
        src, dst = ("async", "async_") if to_attr else ("async_", "async")
        return {(dst if k == src else k): v for k, v in tree.items()}
    return tree


def _schema_keys(schema: Any, prefix: str = "") -> list[str]:
    out = []
    for f in fields(schema):
        key = f"{prefix}{'async' if f.name == 'async_' else f.name}"
        out.append(key)
        default = f.default_factory() if f.default_factory is not field().default_factory else f.default  # type: ignore[misc]
        if is_dataclass(default):
            out.extend(_schema_keys(type(default), key + "."))
    return out


def _suggest(bad_key: str) -> str:
    keys = _schema_keys(TepoConfig)
    close = difflib.get_close_matches(bad_key, keys, n=1, cutoff=0.5)
    if not close:
        leaf = bad_key.rsplit(".", 1)[-1]
        close = [k for k in keys if k.rsplit(".", 1)[-1] in difflib.get_close_matches(leaf, [x.rsplit(".", 1)[-1] for x in keys], n=1)]
    return f"; did you mean '{close[0]}'?" if close else ""


def _full_key(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None) or getattr(exc, "key", None) or "?"
    return str(key).replace("async_", "async")


def _post_init_all(obj: Any) -> None:
    """Re-run __post_init__ checks on an object built by OmegaConf.to_object."""
    if is_dataclass(obj):
        for f in fields(obj):
            _post_init_all(getattr(obj, f.name))
        post = getattr(obj, "__post_init__", None)
        if post is not None:
            post()


def load_config(paths: Sequence[str | Path] = (), overrides: Sequence[str] = ()) -> DictConfig:
    """Compose YAML files and dotlist overrides onto the schema; validate everything."""
    base = OmegaConf.structured(TepoConfig)
    OmegaConf.set_struct(base, True)
    merged = base
    layers: list[tuple[str, Any]] = []
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            raw = OmegaConf.to_container(OmegaConf.load(p), resolve=False)
        except Exception as exc:  # YAML syntax errors carry line numbers
            raise ConfigError(f"{p}: cannot parse YAML ({exc})") from exc
        if raw is None:
            continue
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: top level must be a mapping of config sections, got {type(raw).__name__}")
        layers.append((str(p), OmegaConf.create(_rename_async(raw, to_attr=True))))
    if overrides:
        fixed = []
        for ov in overrides:
            if "=" not in ov:
                raise ConfigError(f"override {ov!r} is not of the form key=value (e.g. algo.mode=dense)")
            k, v = ov.split("=", 1)
            k = "async_" + k[len("async"):] if k == "async" or k.startswith("async.") else k
            fixed.append(f"{k}={v}")
        layers.append(("command line", OmegaConf.from_dotlist(fixed)))
    for source, layer in layers:
        try:
            merged = OmegaConf.merge(merged, layer)
        except ConfigKeyError as exc:
            key = _full_key(exc)
            raise ConfigError(f"{source}: unknown config key '{key}'{_suggest(key)}") from None
        except ValidationError as exc:
            key = _full_key(exc)
            raise ConfigError(f"{source}: {key}: {_validation_msg(exc)}") from None
        except OmegaConfBaseException as exc:
            raise ConfigError(f"{source}: {exc}") from None
    try:
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{_full_key(exc)}: {exc}") from None
    _post_init_all(obj)
    cfg = OmegaConf.structured(obj)
    OmegaConf.set_struct(cfg, True)
    return cfg


def _validation_msg(exc: ValidationError) -> str:
    msg = str(exc).splitlines()[0].replace("async_", "async")
    m = re.search(r"expected one of \[([^\]]*)\]", msg)
    if m:  # omegaconf lists enum member names; users write the lowercase values too
        names = [n.strip() for n in m.group(1).split(",")]
        msg = msg.replace(m.group(0), "expected one of " + ", ".join(n.lower() if n.isupper() and n not in (
            "PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD") else n for n in names))
    return msg


def to_yaml(cfg: DictConfig) -> str:
    """Resolved YAML with the user-facing `async` key."""
    container = _enum_values(OmegaConf.to_container(cfg, resolve=True))
    return OmegaConf.to_yaml(OmegaConf.create(_rename_async(container, to_attr=False)))


def _enum_values(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _enum_values(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_enum_values(v) for v in tree]
    return tree.value if isinstance(tree, enum.Enum) else tree


def save_resolved(cfg: DictConfig, run_dir: str | Path) -> Path:
    """Write the fully resolved config into the run directory (atomically)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    out = run_dir / "config.yaml"
    tmp = out.with_suffix(".yaml.tmp")
    tmp.write_text(to_yaml(cfg), encoding="utf-8")
    tmp.replace(out)
    return out


def validate_resources(cfg: DictConfig, cluster: dict[str, float]) -> None:
    """Check the topology fits a cluster's total resources (`ray.cluster_resources()`)."""
    need_cpu = 0.0
    need_gpu = 0.0
    for role in ("generators", "scorers", "learner", "python_tools", "search_tools"):
        r = cfg.topology[role]
        need_cpu += r.replicas * r.num_cpus
        need_gpu += r.replicas * r.num_gpus
    have_cpu = float(cluster.get("CPU", 0))
    have_gpu = float(cluster.get("GPU", 0))
    if need_cpu > have_cpu + 1e-9:
        raise ConfigError(
            f"topology needs {need_cpu:g} CPUs but the cluster has {have_cpu:g}; lower topology.<role>.num_cpus "
            f"or replicas, or add nodes"
        )
    if need_gpu > have_gpu + 1e-9:
        raise ConfigError(
            f"topology needs {need_gpu:g} GPUs but the cluster has {have_gpu:g}; set topology.<role>.num_gpus=0 "
            f"to run on CPU, or add GPU nodes"
        )
