"""`hf` engine: a transformers causal LM with a batched KV-cache sampling loop.

The dependency-light fallback of DESIGN.md section 2. Requests are grouped into
batches of `engine.max_num_seqs`, left-padded, prefilled once and decoded one
token per step with a `DynamicCache`; position ids come from the attention mask
so padding never shifts a prompt. Sampling is temperature / top-p over the
float32 logits with a seeded `torch.Generator` (temperature 0 = argmax);
weights are updated in place from a `tepo_ray.weights` update (collective
broadcast bucket by bucket, or a file);
`logprobs` are `log_softmax` of the raw logits (the unmodified policy).
Finished rows keep decoding padding until the whole batch is done; their extra
tokens are dropped.

Stop strings (tags that are several tokens): after each step, every running
row decodes the tail of its generated tokens (enough tokens to hold the longest
stop string) with the model's tokenizer; the first step whose tail contains a
stop string ends the row, keeping that whole token, as vLLM does with
`include_stop_str_in_output=True`.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from tepo_ray.engines.base import Engine, GenerationOutput, GenerationRequest, finish_output, register_engine

__all__ = ["HFEngine", "sample_next"]


def sample_next(
    logits: torch.Tensor,
    *,
    temperature: float,
    top_p: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Sample one token per row. logits: [B, V] float32 -> ids [B] (argmax when temperature == 0)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)  # [B, V]
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)  # [B, V]
        # keep the smallest prefix whose mass reaches top_p (always the top token)
        drop = (sorted_p.cumsum(dim=-1) - sorted_p) >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # [B]


@register_engine("hf")
class HFEngine(Engine):
    """transformers `AutoModelForCausalLM` on one device (CUDA when available, else CPU)."""

    def __init__(
        self,
        engine_cfg: Any,
        *,
        model_path: str,
        device: str | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> None:
        super().__init__(engine_cfg, model_path=model_path)
        from transformers import AutoModelForCausalLM, GenerationConfig

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self._model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=dtype or "auto").to(self.device)
        self._model.eval()
        cfg = self.model.config
        eos: set[int] = set()
        for src in (cfg.eos_token_id, _generation_eos(self.model_path, GenerationConfig)):
            if src is not None:
                eos.update([src] if isinstance(src, int) else list(src))
        self._eos = sorted(eos)
        pad = cfg.pad_token_id
        self._pad = int(pad if pad is not None else (self._eos[0] if self._eos else 0))
        self._vocab = int(self.model.get_output_embeddings().weight.shape[0])
        self._calls = 0
        self._tokenizer: Any = None

    # ------------------------------------------------------------------ properties
    @property
    def tokenizer(self) -> Any:
        """The model directory's tokenizer (loaded on first use: only stop strings need it)."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        return self._tokenizer

    @property
    def eos_token_ids(self) -> list[int]:
        return list(self._eos)

    @property
    def vocab_size(self) -> int:
        return self._vocab

    # ------------------------------------------------------------------ generate
    @torch.inference_mode()
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
        self._check_sampling(temperature=temperature, top_p=top_p, stop_token_ids=stop_token_ids, stop=stop)
        stop = list(stop)
        budgets = self._budgets(requests)
        if seed is None:  # reproducible run to run, different call to call
            seed = int(self.cfg.seed) * 1_000_003 + self._calls
        self._calls += 1
        gen = torch.Generator(device=self.device)
        gen.manual_seed(int(seed))
        stop_ids, eos_ids = {int(t) for t in stop_token_ids}, set(self._eos)
        outputs: list[GenerationOutput] = []
        step = max(1, int(self.cfg.max_num_seqs))
        for lo in range(0, len(requests), step):
            chunk = requests[lo : lo + step]
            ids, lps, hits = self._generate_batch(
                [r.prompt_ids for r in chunk], budgets=budgets[lo : lo + step], temperature=temperature,
                top_p=top_p, stop_ids=stop_ids | eos_ids, generator=gen, stop=stop)
            for r, t, lp, hit in zip(chunk, ids, lps, hits):
                outputs.append(finish_output(t, stop_ids=stop_ids, eos_ids=eos_ids, logprobs=lp,
                                             request_id=r.request_id, text_stop=hit))
        return outputs

    def _generate_batch(
        self,
        prompts: list[list[int]],
        *,
        budgets: list[int],
        temperature: float,
        top_p: float,
        stop_ids: set[int],
        generator: torch.Generator,
        stop: list[str],
    ) -> tuple[list[list[int]], list[list[float]], list[str | None]]:
        """Sampled ids and log-probs per row (cut at the stop string's token) and the stop string hit, if any."""
        from transformers import DynamicCache

        B, L = len(prompts), max(len(p) for p in prompts)
        dev = self.device
        input_ids = torch.full((B, L), self._pad, dtype=torch.long, device=dev)  # [B, L] left-padded
        mask = torch.zeros((B, L), dtype=torch.long, device=dev)  # [B, L]
        for i, p in enumerate(prompts):
            input_ids[i, L - len(p):] = torch.tensor(p, dtype=torch.long, device=dev)
            mask[i, L - len(p):] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, L]
        budget = torch.tensor(budgets, device=dev)  # [B]
        stop_t = torch.tensor(sorted(stop_ids), dtype=torch.long, device=dev)  # [S]
        done = torch.zeros(B, dtype=torch.bool, device=dev)  # [B]
        toks: list[torch.Tensor] = []
        lps: list[torch.Tensor] = []
        rows: list[list[int]] = [[] for _ in range(B)]  # generated ids per row, for stop strings
        hits: list[str | None] = [None] * B
        budgets = list(budgets)
        # every character of a stop string comes from at least one token, +2 for partial characters
        window = max((len(x) for x in stop), default=0) + 2
        cache = DynamicCache(config=self.model.config)
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                         use_cache=True, logits_to_keep=1)
        last_pos = pos[:, -1]  # [B]
        for t in range(max(budgets)):
            logits = out.logits[:, -1, :].float()  # [B, V]
            nxt = sample_next(logits, temperature=temperature, top_p=top_p, generator=generator)  # [B]
            lp = torch.log_softmax(logits, dim=-1).gather(-1, nxt[:, None]).squeeze(-1)  # [B]
            toks.append(nxt)
            lps.append(lp)
            if stop:
                for i, tok in enumerate(nxt.tolist()):
                    if bool(done[i]):
                        continue
                    rows[i].append(tok)
                    tail = self.tokenizer.decode(rows[i][-window:], skip_special_tokens=False)
                    hit = next((x for x in stop if x in tail), None)
                    if hit is not None:
                        hits[i], budgets[i] = hit, t + 1
                        budget[i] = t + 1
            done = done | torch.isin(nxt, stop_t) | (budget <= t + 1)
            if bool(done.all()):
                break
            feed = torch.where(done, torch.full_like(nxt, self._pad), nxt)[:, None]  # [B, 1]
            mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=dev)], dim=1)  # [B, L+t+1]
            last_pos = last_pos + 1
            out = self.model(input_ids=feed, attention_mask=mask, position_ids=last_pos[:, None],
                             past_key_values=out.past_key_values, use_cache=True, logits_to_keep=1)
        tok_m = torch.stack(toks, dim=1).tolist()  # [B, T]
        lp_m = torch.stack(lps, dim=1).tolist()  # [B, T]
        return ([row[:n] for row, n in zip(tok_m, budgets)], [row[:n] for row, n in zip(lp_m, budgets)], hits)

    # ------------------------------------------------------------------ weights & scoring
    def update_weights(self, source: Any, *, version: int) -> None:
        from tepo_ray.weights import load_named_tensors, receive
        from tepo_ray.weights.params import state_mismatch

        update = self._weight_update(source, version=version)
        what = f"weight update v{version} ({update.path or update.kind})"
        if update.kind == "collective":
            names = {p.name for p in update.params}
        else:
            from tepo_ray.weights.file import safetensors_names

            names = safetensors_names(update.path or "")
        problem = state_mismatch(self.model, names)
        with receive(update) as named:  # a rejected collective update is still drained (the group stays in step)
            if problem:
                raise ValueError(f"{what} does not match the model: {problem} (expected the learner's full "
                                 f"state dict with HF names); the loaded weights are kept")
            load_named_tensors(self.model, named, what=what)
        self._version = int(version)

    def join_weight_group(self, info: Any, *, rank: int) -> None:
        from tepo_ray.weights import group

        group.join(info, rank=rank, device=self.device if self.device.type == "cuda" else None)

    @torch.inference_mode()
    def sequence_logprobs(self, sequences: Sequence[Sequence[int]]) -> list[list[float]]:
        self._check_sequences(sequences, max_len=int(self.cfg.max_context))
        out: list[list[float]] = []
        step = max(1, int(self.cfg.max_num_seqs))
        for lo in range(0, len(sequences), step):
            chunk = [list(s) for s in sequences[lo : lo + step]]
            B, T = len(chunk), max(len(s) for s in chunk)
            ids = torch.full((B, T), self._pad, dtype=torch.long, device=self.device)  # [B, T] right-padded
            mask = torch.zeros((B, T), dtype=torch.long, device=self.device)  # [B, T]
            for i, s in enumerate(chunk):
                ids[i, : len(s)] = torch.tensor(s, dtype=torch.long, device=self.device)
                mask[i, : len(s)] = 1
            logits = self.model(input_ids=ids, attention_mask=mask).logits.float()  # [B, T, V]
            lp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)  # [B, T-1]
            out.extend(lp[i, : len(s) - 1].tolist() for i, s in enumerate(chunk))
        return out

    def shutdown(self) -> None:
        self._model = None

    @property
    def model(self) -> torch.nn.Module:
        if self._model is None:
            raise RuntimeError("this hf engine was shut down; build a new one with make_engine")
        return self._model


def _generation_eos(path: str, generation_config_cls: Any) -> int | list[int] | None:
    try:
        return generation_config_cls.from_pretrained(path).eos_token_id
    except (OSError, ValueError):
        return None
