"""SFT warm-start on tool-use demonstrations (DESIGN.md section 1, "Two stages").

Cross-entropy on the tokens the policy will generate (loss_mask == 1) only;
prompt and observation tokens (`<result>…</result>`) are context, never
targets::

    L = - Σ_{b,t} mask[b,t] · log π_θ(x[b,t] | x[b,<t]) / Σ_{b,t} mask[b,t]

AdamW with a warmup + cosine (or linear / constant) learning-rate schedule.
The warm-started model is saved as a Hugging Face model directory (weights,
config, tokenizer files copied from `model_path`) into `out_dir`, atomically:
written to a temporary sibling directory, fsynced, then renamed into place.
Every RL arm of a comparison then starts from that directory.

Demonstrations come either from the built-in tasks (the tiny model) or from a
chat-message jsonl file (`data.sft_path`, any `model.path`; see
`load_chat_demonstrations`): one `{"messages": [...]}` object per line, rendered
by the same `PromptBuilder` the agent loop uses, so SFT trains on exactly the
layout RL samples.

Sharded (FSDP2): when a torch.distributed group is initialised (`tepo-ray sft`
with `topology.learner.replicas` > 1 starts one Ray actor per rank through
`tepo_ray.trainer.sft_group`), `sft_train` shards the model with the learner's
own code (`distributed.fsdp.shard_policy`: fp32 master weights and optimizer
state, compute in `dtype`), each rank runs the examples `i % world_size == rank`
of every batch (padded with weight-0 repeats so every rank makes the same
collective calls), the divisor is the global token count and the loss is scaled
by the world size (FSDP averages gradients over ranks), so the update equals the
single-process one. Rank 0 gathers the full weights and writes the model dir.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from tepo_ray.records import Trajectory
from tepo_ray.trainer.batching import (
    TokenBatch,
    check_first_token_untrained,
    make_token_batch,
    micro_batch_slices,
    token_logprobs,
)
from tepo_ray.trainer.checkpoint import commit_dir, copy_tokenizer_files, load_policy

__all__ = ["SFTExample", "as_sft_example", "sft_loss", "LRSchedule", "sft_train", "load_chat_demonstrations",
           "SFTDataError"]

SFTExample = tuple[list[int], list[int]]  # (token_ids, loss_mask)


class SFTDataError(ValueError):
    """A bad demonstration file line: the message names the file, the line and the field."""


def load_chat_demonstrations(path: str | Path, *, builder: Any) -> list[SFTExample]:
    """(token_ids, loss_mask) per line of a chat-message jsonl file.

    Each non-empty line is `{"messages": [{"role": "system"|"user"|"assistant"|"tool",
    "content": str}, ...]}`: optional system, the user question, then the agent's
    assistant turns (tool-call tags included, trained) and tool messages (observations,
    shown as `<result>…</result>` and loss-masked), as `encode_chat_example` lays them
    out. Any bad line raises `SFTDataError` naming `path:line` and the field.
    """
    from tepo_ray.agent.prompts import ChatFormatError, encode_chat_example

    path = Path(path)
    if not path.is_file():
        raise SFTDataError(f"data.sft_path={str(path)!r}: no such file (expected chat-message jsonl)")
    from tepo_ray.data.loaders import iter_jsonl_objects

    out: list[SFTExample] = []
    for where, obj in iter_jsonl_objects(path, error=SFTDataError):
        if "messages" not in obj:
            raise SFTDataError(f"{where}: expected an object with field 'messages' (a list of "
                               f"{{'role', 'content'}} messages)")
        try:
            ids, mask = encode_chat_example(builder, obj["messages"], where=where)
        except ChatFormatError as exc:
            raise SFTDataError(str(exc)) from None
        out.append((ids, mask))
    if not out:
        raise SFTDataError(f"{path}: no demonstrations (the file has no non-empty lines)")
    return out


def as_sft_example(example: Any, *, index: int) -> SFTExample:
    """(token_ids, loss_mask) from a Trajectory, a mapping with those keys, or a (ids, mask) pair."""
    if isinstance(example, Trajectory):
        ids, mask = example.token_ids, example.loss_mask
    elif isinstance(example, Mapping):
        if "token_ids" not in example or "loss_mask" not in example:
            raise ValueError(f"examples[{index}] lacks 'token_ids' / 'loss_mask'; got keys {sorted(example)}")
        ids, mask = example["token_ids"], example["loss_mask"]
    elif isinstance(example, (tuple, list)) and len(example) == 2:
        ids, mask = example
    else:
        raise TypeError(
            f"examples[{index}] is a {type(example).__name__}; expected a Trajectory, a mapping with "
            f"'token_ids' and 'loss_mask', or a (token_ids, loss_mask) pair"
        )
    ids, mask = [int(x) for x in ids], [int(x) for x in mask]
    if len(ids) != len(mask):
        raise ValueError(f"examples[{index}]: token_ids has {len(ids)} entries, loss_mask {len(mask)}")
    if any(m not in (0, 1) for m in mask):
        raise ValueError(f"examples[{index}]: loss_mask must hold only 0/1")
    if not any(mask):
        raise ValueError(f"examples[{index}]: loss_mask is all 0, nothing to learn from")
    check_first_token_untrained(mask, what=f"examples[{index}]")
    return ids, mask


def sft_loss(
    model: torch.nn.Module, batch: TokenBatch, *, num_tokens: int | None = None, chunk_size: int = 1024
) -> torch.Tensor:
    """Masked next-token cross-entropy: Σ mask · (-log π) / num_tokens (default: this batch's mask sum)."""
    logp, _ = token_logprobs(model, batch, chunk_size=chunk_size)  # [B, T], 0 where mask == 0
    mask = batch.loss_mask.to(logp.device)  # [B, T]
    denom = float(num_tokens) if num_tokens is not None else max(float(mask.sum()), 1.0)
    return -(logp * mask).sum() / denom


class LRSchedule:
    """LR multiplier: linear warmup, then cosine / linear decay to `min_ratio`, or constant (picklable)."""

    KINDS = ("cosine", "linear", "constant")

    def __init__(self, kind: str, *, total_steps: int, warmup_steps: int = 0, min_ratio: float = 0.0) -> None:
        if kind not in self.KINDS:
            raise ValueError(f"schedule={kind!r} is unknown; expected one of {self.KINDS}")
        self.kind, self.total, self.warmup, self.min_ratio = kind, max(total_steps, 1), warmup_steps, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.kind == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup) / max(self.total - self.warmup, 1))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if self.kind == "cosine" else 1.0 - progress
        return self.min_ratio + (1.0 - self.min_ratio) * decay


def _progress(enabled: bool):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]SFT"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
    )


def sft_train(
    model_path: str | Path,
    *,
    examples: Sequence[Any],
    steps: int,
    lr: float,
    batch_size: int,
    out_dir: str | Path,
    seed: int = 0,
    progress: bool = True,
    schedule: str = "cosine",
    warmup_steps: int = 0,
    min_lr_ratio: float = 0.0,
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
    micro_batch_size: int | None = None,
    device: str = "cpu",
    dtype: str = "float32",
) -> dict[str, Any]:
    """Fine-tune `model_path` on demonstrations; save the result into `out_dir`; return metrics.

    Each step draws `batch_size` examples from a seeded permutation (reshuffled every
    epoch) and accumulates over micro-batches of `micro_batch_size` (default: the
    whole batch) with the batch-wide token count as divisor, so the update does not
    depend on the micro-batch size.

    Returns {"loss_first", "loss_last", "loss_history", "steps", "tokens", "time_s",
    "tokens_per_s", "out_dir"}; the same (minus history) is written to `out_dir/sft_metrics.json`.
    """
    if steps < 1:
        raise ValueError(f"steps={steps}: expected >= 1")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: expected >= 1")
    if lr <= 0:
        raise ValueError(f"lr={lr}: expected > 0")
    data = [as_sft_example(ex, index=i) for i, ex in enumerate(examples)]
    if not data:
        raise ValueError("examples is empty; SFT needs at least one demonstration")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)

    from tepo_ray.distributed import process_group

    sharded = process_group.is_initialized()
    rank = process_group.rank() if sharded else 0
    world = process_group.world_size() if sharded else 1
    model = load_policy(model_path, device=device, dtype="float32" if sharded else dtype)
    model.train()
    policy: torch.nn.Module = model
    if sharded:
        from tepo_ray.distributed.fsdp import shard_policy
        from tepo_ray.trainer.batching import PolicyLogprobs
        from tepo_ray.trainer.checkpoint import DTYPES

        policy = shard_policy(PolicyLogprobs(model), param_dtype=DTYPES[dtype])
    pad_id = int(getattr(model.config, "pad_token_id", None) or 0)
    vocab = int(model.get_output_embeddings().weight.shape[0])
    for i, (ids, _) in enumerate(data):
        if min(ids) < 0 or max(ids) >= vocab:
            raise ValueError(f"examples[{i}]: token ids outside the model vocabulary [0, {vocab})")
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, LRSchedule(schedule, total_steps=steps, warmup_steps=warmup_steps, min_ratio=min_lr_ratio)
    )
    mbs = micro_batch_size or batch_size

    order: list[int] = []
    losses: list[float] = []
    total_tokens = 0
    t0 = time.perf_counter()
    with _progress(progress and rank == 0) as bar:
        task = bar.add_task("sft", total=steps, loss=float("nan"), lr=lr)
        for step in range(steps):
            idx = []
            while len(idx) < batch_size:
                if not order:
                    order = torch.randperm(len(data), generator=gen).tolist()
                idx.append(order.pop())
            batch_ex = [data[i] for i in idx]
            n_tok = sum(sum(m) for _, m in batch_ex)
            optimizer.zero_grad(set_to_none=True)
            step_loss = 0.0
            for mb, weight in _rank_micro_batches(batch_ex, mbs, rank=rank, world=world):
                batch = make_token_batch([e[0] for e in mb], [e[1] for e in mb], pad_id=pad_id)
                loss = sft_loss(policy, batch, num_tokens=n_tok)
                (loss * (weight * world)).backward()  # sharded: FSDP averages over ranks, we want the sum
                step_loss += weight * float(loss.detach())
            if sharded:
                step_loss = _all_reduce_sum(step_loss)
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_grad_norm)
            current_lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            losses.append(step_loss)
            total_tokens += n_tok
            bar.update(task, advance=1, loss=step_loss, lr=current_lr)
    elapsed = time.perf_counter() - t0

    metrics: dict[str, Any] = {
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "steps": steps,
        "tokens": total_tokens,
        "time_s": elapsed,
        "tokens_per_s": total_tokens / max(elapsed, 1e-9),
        "out_dir": str(out_dir),
    }
    if sharded:  # every rank takes part in gathering the shards; rank 0 writes the model dir
        from tepo_ray.weights.params import full_state_dict

        state = full_state_dict(model, device="cpu")
        if rank == 0:
            full = load_policy(model_path, device="cpu", dtype=dtype)
            full.load_state_dict({k: v.to(full.state_dict()[k].dtype) for k, v in state.items()})
            _save_model_atomic(full.eval(), out_dir=Path(out_dir), tokenizer_from=str(model_path), metrics=metrics)
        del state
        torch.distributed.barrier()
    else:
        _save_model_atomic(model.eval(), out_dir=Path(out_dir), tokenizer_from=str(model_path), metrics=metrics)
    metrics["loss_history"] = losses
    return metrics


def _rank_micro_batches(batch_ex: Sequence[Any], mbs: int, *, rank: int, world: int
                        ) -> list[tuple[list[Any], float]]:
    """(examples, loss weight) of this rank's micro-batches: examples `i % world == rank` in slices of `mbs`,
    padded with weight-0 repeats to rank 0's count so every rank makes the same collective calls."""
    mine = [batch_ex[i] for i in range(rank, len(batch_ex), world)]
    out = [(mine[sl], 1.0) for sl in micro_batch_slices(len(mine), mbs)] if mine else []
    if world > 1:
        steps = len(micro_batch_slices(len(range(0, len(batch_ex), world)), mbs))
        out += [(mine[:1] or [batch_ex[0]], 0.0)] * (steps - len(out))
    return out


def _all_reduce_sum(x: float) -> float:
    t = torch.tensor([x], dtype=torch.float64)
    if torch.distributed.get_backend() == "nccl":
        t = t.cuda()
    torch.distributed.all_reduce(t)
    return float(t.item())


def _save_model_atomic(model: torch.nn.Module, *, out_dir: Path, tokenizer_from: str, metrics: dict) -> None:
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        model.save_pretrained(str(tmp))
        if Path(tokenizer_from).is_dir():
            copy_tokenizer_files(tokenizer_from, tmp)
        else:  # a hub id: save its tokenizer (chat template included) next to the weights
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(str(tmp))
        (tmp / "sft_metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True), encoding="utf-8")
        commit_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
