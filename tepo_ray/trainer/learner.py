"""The learner: rewards -> advantages -> clipped-surrogate update -> versioned weights.

One `train_step(trajectories)` (DESIGN.md section 1):

1. outcome scores `F1(x, y_i)` (`algo.outcome_scores`, unless `trajectory.score` is set);
2. rewards and token advantages for `algo.mode` (grpo | sparse | dense) with
   `algo.compute_advantages`, groups from `trajectory.group_id`;
3. the token-level clipped surrogate against the behaviour log-probs written by
   the entropy scorer (importance ratio pi_theta / pi_behaviour, so stale samples
   are corrected), optional k3 KL to a frozen copy of the initial model,
   aggregated over the *whole* batch: micro-batches of `trainer.micro_batch_size`
   sequences each contribute `sum(token losses) / num_tokens(batch)`, so the
   accumulated gradient equals the full-batch token mean;
4. grad-norm clipping, AdamW, linear-warmup schedule; `version += 1` and the new
   weights are published as `<run_dir>/weights/v{version}.safetensors`.

Log-probs come from `batching.PolicyLogprobs` (chunked output head, recomputed in
backward: no [tokens x vocab] tensor); `trainer.gradient_checkpointing` recomputes
the decoder layers in backward.

Sharded (`sharded=True`, one of `world_size` ranks of a process group formed by
`tepo_ray.distributed.process_group`): the model is sharded with FSDP2
(`distributed.fsdp.shard_policy`, fp32 master weights, `model.dtype` compute).
Every rank receives the whole batch and computes scores and advantages for all
of it (group normalisation needs whole groups; it is cheap), then runs forward
and backward on its own sequences `i % world_size == rank`. The token count used
for normalisation is the global one, and the loss is scaled by `world_size`
because FSDP averages gradients over ranks, so the update equals the
single-process update on the same batch. Ranks run the same number of
micro-batches (a rank that ran out repeats one with zero weight) since every
forward/backward is collective. Weight publication and checkpoints are
collective too: rank 0 writes the files.

Override points for variants: `compute_scores`, `compute_advantages`, `compute_loss`.
"""

from __future__ import annotations

import copy
import logging
import math
import random
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from tepo_ray import algo
from tepo_ray.distributed import process_group
from tepo_ray.distributed.checkpoint import DCP_DIR, is_sharded_checkpoint, load_dcp
from tepo_ray.distributed.device import select_device
from tepo_ray.weights.params import full_state_dict
from tepo_ray.metrics import call_stats
from tepo_ray.records import RecordError, Trajectory
from tepo_ray.trainer.batching import (
    PolicyLogprobs,
    check_first_token_untrained,
    make_token_batch,
    micro_batch_slices,
    pad_values,
    token_logprobs,
)
from tepo_ray.trainer.checkpoint import (
    DTYPES,
    capture_rng_state,
    copy_tokenizer_files,
    list_weight_versions,
    load_latest,
    load_policy,
    load_weights_into,
    publish_weights,
    restore_rng_state,
    save_checkpoint,
    save_model_dir,
    weight_file_path,
)

__all__ = ["Learner", "LearnerMetric", "AdvantageInputs", "build_advantage_inputs", "LinearWarmup"]

log = logging.getLogger(__name__)


class LearnerMetric:
    """Keys of the metrics dict returned by `Learner.train_step`."""

    LOSS = "learner/loss"
    PG_CLIP_FRAC = "learner/pg_clip_frac"
    APPROX_KL = "learner/approx_kl"
    REF_KL = "learner/ref_kl"
    GRAD_NORM = "learner/grad_norm"
    LR = "learner/lr"
    REWARD_MEAN = "learner/reward_mean"
    REWARD_STD = "learner/reward_std"
    SCORE_MEAN = "learner/score_mean"
    TOOL_CALLS = "learner/tool_calls_per_traj"
    M_OVER_N = "learner/m_over_n_mean"  # over trajectories with >= 1 call (0 when none has)
    FRAC_WITH_CALLS = "learner/frac_with_tool_calls"
    DELTA_H_MEAN = "learner/delta_entropy_mean"  # over calls with a defined ΔH (0 when none)
    BEHAVIOUR_ENTROPY = "learner/behaviour_entropy_mean"
    ADV_MEAN = "learner/advantage_mean"  # over trained tokens
    ADV_STD = "learner/advantage_std"
    TOKENS = "learner/tokens_trained"
    SEQUENCES = "learner/sequences"
    STALENESS_MEAN = "learner/staleness_mean"
    STALENESS_MAX = "learner/staleness_max"
    SKIPPED = "learner/update_skipped"  # 1 when no trained token or a non-finite gradient
    TIME = "learner/step_time_s"
    STEP = "learner/step"
    VERSION = "learner/version"


class LinearWarmup:
    """LR multiplier: (s + 1) / warmup for the first `warmup` steps, then 1 (a picklable LambdaLR callable)."""

    def __init__(self, warmup_steps: int) -> None:
        self.warmup_steps = int(warmup_steps)

    def __call__(self, step: int) -> float:
        if self.warmup_steps <= 0:
            return 1.0
        return min(1.0, (step + 1) / self.warmup_steps)


class AdvantageInputs:
    """Padded tensors `algo.compute_advantages` needs for a batch of B trajectories (K = max calls, >= 1)."""

    def __init__(self, trajectories: Sequence[Trajectory], *, length: int) -> None:
        b = len(trajectories)
        k = max([t.num_calls for t in trajectories] + [1])
        group_ids: dict[str, int] = {}
        self.group_index = torch.tensor(
            [group_ids.setdefault(t.group_id, len(group_ids)) for t in trajectories], dtype=torch.long
        )  # [B]
        self.num_calls = torch.tensor([t.num_calls for t in trajectories], dtype=torch.long)  # [B]
        self.decreased = torch.zeros(b, k, dtype=torch.bool)  # [B, K]
        self.call_mask = torch.zeros(b, k, dtype=torch.bool)  # [B, K]
        self.call_spans = torch.zeros(b, k, 2, dtype=torch.long)  # [B, K, 2]
        self.malformed = torch.zeros(b, k, dtype=torch.bool)  # [B, K]: ToolCall.malformed (algo.malformed_calls)
        for i, t in enumerate(trajectories):
            for j, call in enumerate(t.tool_calls):
                seg = t.segments[call.segment_index]
                self.call_mask[i, j] = True
                self.decreased[i, j] = bool(call.entropy_decreased)
                self.malformed[i, j] = call.malformed
                self.call_spans[i, j, 0], self.call_spans[i, j, 1] = seg.start, seg.end
        self.loss_mask = pad_values([t.loss_mask for t in trajectories], length=length)  # [B, T]


def build_advantage_inputs(trajectories: Sequence[Trajectory]) -> AdvantageInputs:
    return AdvantageInputs(trajectories, length=max(len(t.token_ids) for t in trajectories))


def _mode_name(mode: Any) -> str:
    return mode.value if hasattr(mode, "value") else str(mode)


def _masked_mean_std(x: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    n = mask.sum()
    if n <= 0:
        return 0.0, 0.0
    mean = (x * mask).sum() / n
    var = (((x - mean) ** 2) * mask).sum() / n
    return float(mean), float(var.sqrt())


class Learner:
    """Holds the policy, its optimizer and the weight/checkpoint versions.

    Args:
        model_path: HF model directory of the initial policy (the SFT checkpoint); also the KL reference.
        algo_cfg: `AlgoConfig` (mode, alpha, clip, lr, KL, ...).
        trainer_cfg: `TrainerConfig` (micro_batch_size, checkpoint_dir/interval, keep_checkpoints).
        run_dir: weights go to `<run_dir>/weights`, checkpoints to `trainer.checkpoint_dir`
            or `<run_dir>/checkpoints`.
        seed: seeds python, numpy and torch.
        keep_weight_versions: published weight files kept on disk; must exceed
            `async.max_staleness` so scorers can still load every admissible behaviour version.
        temperature: sampling temperature of the generators (log-probs use logits / temperature).
        publish_initial: publish the initial weights as `v{initial_version}` at construction.
        device: "cpu", "cuda[:i]" or "auto" (the GPU of this Ray worker's bundle, else CPU).
        dtype: compute dtype (`model.dtype`). Unsharded, the weights are held in it; sharded,
            they are held in fp32 and FSDP2 computes in `dtype`, reducing gradients in fp32.
        sharded: shard with FSDP2 over the current torch.distributed group (must exist).
        publish_files: write weight files at all; False when a `tepo_ray.weights` collective
            transport carries the weights (no file is written, `publish_weights` is a no-op).
    """

    def __init__(
        self,
        model_path: str | Path,
        *,
        algo_cfg: Any,
        trainer_cfg: Any,
        run_dir: str | Path,
        seed: int = 0,
        device: str = "cpu",
        dtype: str = "float32",
        keep_weight_versions: int = 4,
        temperature: float = 1.0,
        initial_version: int = 0,
        publish_initial: bool = True,
        sharded: bool = False,
        publish_files: bool = True,
    ) -> None:
        if keep_weight_versions < 1:
            raise ValueError(f"keep_weight_versions must be >= 1, got {keep_weight_versions}")
        self.model_path = str(model_path)
        self.algo_cfg = algo_cfg
        self.trainer_cfg = trainer_cfg
        self.run_dir = Path(run_dir)
        self.weights_dir = self.run_dir / "weights"
        self.checkpoint_dir = (
            Path(trainer_cfg.checkpoint_dir) if trainer_cfg.checkpoint_dir else self.run_dir / "checkpoints"
        )
        self.seed = int(seed)
        self.device = select_device(device)
        self.sharded = bool(sharded)
        if self.sharded and not process_group.is_initialized():
            raise RuntimeError("sharded=True needs a torch.distributed process group; call "
                               "tepo_ray.distributed.process_group.init_process_group first")
        self.rank = process_group.rank() if self.sharded else 0
        self.world_size = process_group.world_size() if self.sharded else 1
        self.keep_weight_versions = int(keep_weight_versions)
        self.temperature = float(temperature) if temperature > 0 else 1.0  # greedy sampling: T = 1
        self.publish_files = bool(publish_files)
        self.mode = _mode_name(algo_cfg.mode)

        random.seed(self.seed)
        np.random.seed(self.seed)
        torch.manual_seed(self.seed)

        self.compute_dtype = str(dtype)  # what generators and scorers receive the weights in
        # Sharded: fp32 master weights, FSDP2 casts to `dtype` for compute.
        self.model = load_policy(self.model_path, device=self.device, dtype="float32" if self.sharded else dtype)
        if getattr(trainer_cfg, "gradient_checkpointing", False):
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model.train()
        self.ref_model = None
        self.ref_policy: PolicyLogprobs | None = None
        if algo_cfg.kl_coef > 0:
            self.ref_model = copy.deepcopy(self.model).eval()
            self.ref_model.requires_grad_(False)
            self.ref_policy = PolicyLogprobs(self.ref_model)
        self.policy = PolicyLogprobs(self.model)  # wraps self.model; same parameters
        if self.sharded:
            from tepo_ray.distributed.fsdp import shard_policy

            if dtype not in DTYPES:
                raise ValueError(f"dtype={dtype!r} is invalid; expected one of {sorted(DTYPES)}")
            shard_policy(self.policy, param_dtype=DTYPES[dtype])
            if self.ref_policy is not None:
                shard_policy(self.ref_policy, param_dtype=DTYPES[dtype])
        self.pad_id = int(getattr(self.model.config, "pad_token_id", None) or 0)
        self.vocab_size = int(self.model.get_output_embeddings().weight.shape[0])

        decay = [p for p in self.model.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.requires_grad and p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": float(algo_cfg.weight_decay)},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=float(algo_cfg.lr),
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, LinearWarmup(algo_cfg.warmup_steps))
        self.step = 0
        self.version = int(initial_version)
        self.last_restore_note: str | None = None
        if publish_initial:
            self.publish_weights()

    # ------------------------------------------------------------------ info
    def ready(self) -> dict[str, Any]:
        return {"step": self.step, "version": self.version, "weights": str(self.latest_weights()[0])}

    def latest_weights(self) -> tuple[str, int]:
        """(path, version) of the current weights' file (as published by `publish_weights`)."""
        return str(weight_file_path(self.weights_dir, self.version)), self.version

    def publish_weights(self) -> tuple[str, int]:
        """Write `<run_dir>/weights/v{version}.safetensors` atomically; keep the last `keep_weight_versions`.

        A no-op when a collective transport carries the weights (`publish_files=False`).
        Sharded: collective (every rank gathers the full weights; rank 0 writes).
        """
        if not self.publish_files:
            return self.latest_weights()
        if not self.sharded:
            path = publish_weights(
                self.model, weights_dir=self.weights_dir, version=self.version, keep=self.keep_weight_versions
            )
            return str(path), self.version
        state = full_state_dict(self.model, device="cpu")
        if self.rank == 0:
            publish_weights(state, weights_dir=self.weights_dir, version=self.version, keep=self.keep_weight_versions)
        del state
        torch.distributed.barrier()
        return str(weight_file_path(self.weights_dir, self.version)), self.version

    def checkpoint_due(self) -> bool:
        """True when `trainer.checkpoint_interval` divides the number of steps taken."""
        k = int(self.trainer_cfg.checkpoint_interval)
        return k > 0 and self.step > 0 and self.step % k == 0

    # ------------------------------------------------------------------ override points
    def compute_scores(self, trajectories: Sequence[Trajectory]) -> torch.Tensor:
        """Outcome scores F1 [B]: `trajectory.score` when set, else `algo.outcome_scores`."""
        todo = [i for i, t in enumerate(trajectories) if t.score is None]
        scores = torch.tensor([t.score if t.score is not None else 0.0 for t in trajectories], dtype=torch.float64)
        if todo:
            for i in todo:
                if not trajectories[i].gold:
                    raise RecordError(
                        f"trajectory {trajectories[i].uid}: no score and no gold answers; expected a non-empty "
                        f"`gold` list (or `score` set by the driver)"
                    )
            computed = algo.outcome_scores(
                [trajectories[i].answer for i in todo],
                [trajectories[i].gold for i in todo],
                task_types=[trajectories[i].task_type for i in todo],
            )
            scores[todo] = torch.as_tensor(computed, dtype=torch.float64)
        return scores  # [B]

    def compute_advantages(
        self, trajectories: Sequence[Trajectory], scores: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """(token advantages [B, T], rewards [B], metrics) for `algo.mode`; T = longest trajectory."""
        inputs = build_advantage_inputs(trajectories)
        nt = self.algo_cfg.sparse.no_tool_value
        token_adv, rewards, metrics = algo.compute_advantages(
            self.mode,
            scores=scores,
            group_index=inputs.group_index,
            num_calls=inputs.num_calls,
            decreased=inputs.decreased,
            call_mask=inputs.call_mask,
            call_spans=inputs.call_spans,
            malformed=inputs.malformed,
            malformed_calls=str(getattr(self.algo_cfg, "malformed_calls", "exclude")),
            loss_mask=inputs.loss_mask,
            alpha=float(self.algo_cfg.alpha),
            no_tool_value=nt if nt == "score" else float(nt),
            eps=float(self.algo_cfg.adv_eps),
            std_normalize=bool(self.algo_cfg.adv_std_normalize),
        )
        return token_adv, rewards, dict(metrics or {})

    def compute_loss(
        self,
        *,
        logprobs: torch.Tensor,
        old_logprobs: torch.Tensor,
        advantages: torch.Tensor,
        loss_mask: torch.Tensor,
        ref_logprobs: torch.Tensor | None,
        num_tokens: int,
        num_sequences: int,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Policy loss `algo.policy_loss` (registry name) of one micro-batch, normalised by the whole
        batch's token / sequence count."""
        loss_fn = algo.get_policy_loss(getattr(self.algo_cfg, "policy_loss", "clipped"))
        return loss_fn(
            logprobs=logprobs,
            old_logprobs=old_logprobs,
            advantages=advantages,
            loss_mask=loss_mask,
            clip_low=float(self.algo_cfg.clip_low),
            clip_high=float(self.algo_cfg.clip_high),
            ref_logprobs=ref_logprobs,
            kl_coef=float(self.algo_cfg.kl_coef),
            loss_agg=str(self.algo_cfg.loss_agg),
            num_tokens=num_tokens,
            num_sequences=num_sequences,
        )

    # ------------------------------------------------------------------ the step
    def _check(self, trajs: Sequence[Trajectory]) -> None:
        if not trajs:
            raise ValueError("train_step got an empty batch; expected at least one trajectory")
        for t in trajs:
            if not isinstance(t, Trajectory):
                raise TypeError(f"expected tepo_ray.records.Trajectory, got {type(t).__name__}")
            t.validate()
            if not t.token_ids:
                raise RecordError(f"trajectory {t.uid}: token_ids is empty; expected prompt + generated tokens")
            check_first_token_untrained(t.loss_mask, what=f"trajectory {t.uid}")
            if t.behaviour_logprobs is None:
                raise RecordError(
                    f"trajectory {t.uid}: behaviour_logprobs is None; score it with EntropyScorer before training"
                )
            if self.mode != "grpo" and t.tool_calls and t.entropies is None:
                raise RecordError(
                    f"trajectory {t.uid}: algo.mode={self.mode} needs ΔH per tool call but entropies is None; "
                    f"score it with EntropyScorer before training"
                )
            if max(t.token_ids) >= self.vocab_size or min(t.token_ids) < 0:
                raise RecordError(
                    f"trajectory {t.uid}: token ids outside the model vocabulary [0, {self.vocab_size})"
                )

    def train_step(self, trajectories: Sequence[Trajectory]) -> dict[str, float]:
        """One optimizer step on a batch of whole groups; writes score/reward back onto the trajectories.

        = `compute_gradients` + `apply_update`; then `version += 1` and the weights are published.
        """
        t0 = time.perf_counter()
        metrics = self.compute_gradients(trajectories)
        metrics.update(self.apply_update(has_tokens=metrics[LearnerMetric.TOKENS] > 0))
        metrics[LearnerMetric.TIME] = time.perf_counter() - t0
        return metrics

    def compute_gradients(self, trajectories: Sequence[Trajectory]) -> dict[str, float]:
        """Scores, rewards, advantages and the accumulated gradient of the batch loss (left in `.grad`).

        Micro-batches of `trainer.micro_batch_size` sequences; each micro-batch loss is
        normalised by the whole batch's trained-token (or sequence) count, so the sum of
        their gradients is the gradient of the full-batch loss.
        """
        trajs = list(trajectories)
        self._check(trajs)
        scores = self.compute_scores(trajs)  # [B]
        token_adv, rewards, adv_metrics = self.compute_advantages(trajs, scores)  # [B, T], [B]
        for t, s, r in zip(trajs, scores.tolist(), rewards.tolist()):
            t.score, t.reward = float(s), float(r)

        metrics = self._batch_metrics(trajs, scores, rewards, token_adv)
        num_tokens = sum(t.num_generated for t in trajs)
        num_sequences = sum(1 for t in trajs if t.num_generated > 0)
        chunk = int(self.algo_cfg.entropy_chunk_size)
        agg: dict[str, float] = {}
        loss_total = 0.0
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        for idx, weight in self._micro_batches(len(trajs)):
            mb = [trajs[i] for i in idx]
            batch = make_token_batch([t.token_ids for t in mb], [t.loss_mask for t in mb], pad_id=self.pad_id)
            length = batch.input_ids.shape[1]
            mb_tokens = batch.num_tokens
            if mb_tokens == 0 and not self.sharded:
                continue
            if mb_tokens == 0:
                weight = 0.0  # sharded: the collective forward/backward must still run
            batch = batch.to(self.device)
            old = pad_values([t.behaviour_logprobs for t in mb], length=length).to(self.device)  # [b, T]
            adv = token_adv[torch.tensor(idx), :length].to(self.device, torch.float32)  # [b, T]
            ref_lp = None
            if self.ref_policy is not None:
                with torch.no_grad():
                    ref_lp, _ = token_logprobs(self.ref_policy, batch, chunk_size=chunk,
                                               temperature=self.temperature)  # [b, T]
            logp, _ = token_logprobs(self.policy, batch, chunk_size=chunk, temperature=self.temperature)  # [b, T]
            loss, m = self.compute_loss(
                logprobs=logp, old_logprobs=old, advantages=adv, loss_mask=batch.loss_mask,
                ref_logprobs=ref_lp, num_tokens=max(num_tokens, 1), num_sequences=max(num_sequences, 1),
            )
            (loss * (weight * self.world_size)).backward()  # FSDP averages over ranks; we want the sum
            if weight == 0.0:
                continue
            loss_total += float(loss.detach())
            # Per-call metrics are means over the micro-batch's tokens: token-weight them.
            w = mb_tokens / num_tokens
            for key, val in (m or {}).items():
                if key in ("loss", "num_tokens") or not _is_number(val) or not math.isfinite(float(val)):
                    continue
                if key.endswith("_max"):
                    agg[key] = max(agg.get(key, float("-inf")), float(val))
                else:
                    agg[key] = agg.get(key, 0.0) + w * float(val)

        if self.sharded:
            loss_total, agg = _merge_rank_metrics(loss_total, agg)
        metrics.update({f"learner/algo/{k}": float(v) for k, v in adv_metrics.items() if _is_number(v)})
        metrics.update({f"learner/loss/{k}": v for k, v in agg.items()})
        metrics.update({
            LearnerMetric.LOSS: loss_total,
            LearnerMetric.PG_CLIP_FRAC: agg.get("clip_fraction", 0.0),
            LearnerMetric.APPROX_KL: agg.get("approx_kl", 0.0),
            LearnerMetric.REF_KL: agg.get("kl_ref", 0.0),
            LearnerMetric.TOKENS: float(num_tokens),
            LearnerMetric.SEQUENCES: float(len(trajs)),
        })
        return metrics

    def _micro_batches(self, n: int) -> list[tuple[list[int], float]]:
        """(trajectory indices, loss weight) of this rank's micro-batches.

        Unsharded: consecutive slices of `trainer.micro_batch_size`. Sharded: this rank's
        sequences `i % world_size == rank` in slices, padded to the count rank 0 runs
        with weight-0 repeats, so every rank makes the same number of collective calls.
        """
        size = int(self.trainer_cfg.micro_batch_size)
        mine = list(range(self.rank, n, self.world_size))
        out = [(mine[sl], 1.0) for sl in micro_batch_slices(len(mine), size)] if mine else []
        if self.sharded:
            steps = len(micro_batch_slices(len(range(0, n, self.world_size)), size))
            filler = mine[:1] or [0]
            out += [(filler, 0.0)] * (steps - len(out))
        return out

    def apply_update(self, *, has_tokens: bool = True) -> dict[str, float]:
        """Clip, optimizer + scheduler step, `version += 1`, publish. Skips the optimizer step
        (not the version bump) when the batch had no trained token or the gradient is non-finite."""
        skipped = 0.0
        grad_norm = 0.0
        if has_tokens:
            params = [p for p in self.model.parameters() if p.requires_grad]
            norm = torch.nn.utils.clip_grad_norm_(params, float(self.algo_cfg.max_grad_norm))
            grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
            if math.isfinite(grad_norm):
                self.optimizer.step()
            else:
                log.warning("step %d: non-finite gradient norm %s; update skipped", self.step, grad_norm)
                skipped = 1.0
        else:
            log.warning("step %d: the batch has no trained token; update skipped", self.step)
            skipped = 1.0
        lr = float(self.optimizer.param_groups[0]["lr"])
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        self.version += 1
        self.publish_weights()
        return {
            LearnerMetric.GRAD_NORM: grad_norm,
            LearnerMetric.LR: lr,
            LearnerMetric.SKIPPED: skipped,
            LearnerMetric.STEP: float(self.step),
            LearnerMetric.VERSION: float(self.version),
        }

    def _batch_metrics(
        self, trajs: Sequence[Trajectory], scores: torch.Tensor, rewards: torch.Tensor, token_adv: torch.Tensor
    ) -> dict[str, float]:
        inputs_mask = pad_values([t.loss_mask for t in trajs], length=token_adv.shape[1])  # [B, T]
        adv_mean, adv_std = _masked_mean_std(token_adv.float(), inputs_mask)
        with_calls = [t for t in trajs if t.num_calls > 0]
        cs = call_stats(trajs, malformed_calls=str(getattr(self.algo_cfg, "malformed_calls", "exclude")))
        ent = [
            e for t in trajs if t.entropies is not None for e, m in zip(t.entropies, t.loss_mask) if m
        ]
        staleness = [self.version - t.behaviour_version for t in trajs if t.behaviour_version >= 0]
        r = rewards.float()
        return {
            LearnerMetric.REWARD_MEAN: float(r.mean()),
            LearnerMetric.REWARD_STD: float(r.std(unbiased=False)) if r.numel() > 1 else 0.0,
            LearnerMetric.SCORE_MEAN: float(scores.mean()),
            LearnerMetric.TOOL_CALLS: float(np.mean([t.num_calls for t in trajs])),
            LearnerMetric.M_OVER_N: cs["m_over_n"] if cs["m_over_n"] is not None else 0.0,
            LearnerMetric.FRAC_WITH_CALLS: len(with_calls) / len(trajs),
            LearnerMetric.DELTA_H_MEAN: cs["delta_h_mean"] if cs["delta_h_mean"] is not None else 0.0,
            LearnerMetric.BEHAVIOUR_ENTROPY: float(np.mean(ent)) if ent else 0.0,
            LearnerMetric.ADV_MEAN: adv_mean,
            LearnerMetric.ADV_STD: adv_std,
            LearnerMetric.STALENESS_MEAN: float(np.mean(staleness)) if staleness else 0.0,
            LearnerMetric.STALENESS_MAX: float(max(staleness)) if staleness else 0.0,
        }

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, extra: dict[str, Any] | None = None, *, on_file_written: Any = None) -> str:
        """Checkpoint model, optimizer, scheduler, step/version, RNG states and the driver's `extra`."""
        extra = dict(extra or {})
        if self.sharded:
            return self._save_sharded_checkpoint(extra, on_file_written=on_file_written)
        state = {
            "format": 1,
            "step": self.step,
            "version": self.version,
            "seed": self.seed,
            "mode": self.mode,
            "rng": capture_rng_state(),
            "extra": extra,
        }
        writers = {
            "model": lambda p: save_model_dir(self.model, p, tokenizer_from=self.model_path),
            "optimizer.pt": lambda p: torch.save(self.optimizer.state_dict(), p),
            "scheduler.pt": lambda p: torch.save(self.scheduler.state_dict(), p),
            "trainer_state.pt": lambda p: torch.save(state, p),
        }
        path = save_checkpoint(
            self.checkpoint_dir,
            step=self.step,
            writers=writers,
            keep=int(self.trainer_cfg.keep_checkpoints),
            on_file_written=on_file_written,
        )
        return str(path)

    def _save_sharded_checkpoint(self, extra: dict[str, Any], *, on_file_written: Any = None) -> str:
        """Collective: DCP shards of model + optimizer, and (rank 0) config, scheduler, trainer state."""
        from tepo_ray.distributed.checkpoint import MODEL_CONFIG_DIR, save_sharded_checkpoint

        state = {
            "format": 2,
            "sharded": True,
            "world_size": self.world_size,
            "step": self.step,
            "version": self.version,
            "seed": self.seed,
            "mode": self.mode,
            "rng": capture_rng_state(),
            "extra": extra,
        }

        def write_config(p: Path) -> None:
            p.mkdir(parents=True)
            self.model.config.save_pretrained(str(p))
            copy_tokenizer_files(self.model_path, p)

        path = save_sharded_checkpoint(
            self.checkpoint_dir, step=self.step, model=self.model, optimizer=self.optimizer,
            keep=int(self.trainer_cfg.keep_checkpoints), on_file_written=on_file_written,
            writers={
                MODEL_CONFIG_DIR: write_config,
                "scheduler.pt": lambda p: torch.save(self.scheduler.state_dict(), p),
                "trainer_state.pt": lambda p: torch.save(state, p),
            },
        )
        return str(path)

    def has_checkpoint(self, ckpt_dir: str | Path | None = None) -> bool:
        return load_latest(Path(ckpt_dir) if ckpt_dir else self.checkpoint_dir) is not None

    def restore(self, ckpt_dir: str | Path | None = None) -> dict[str, Any]:
        """Load the newest complete checkpoint; returns the driver's `extra` dict saved with it.

        Raises FileNotFoundError when the directory holds no complete checkpoint.
        """
        root = Path(ckpt_dir) if ckpt_dir else self.checkpoint_dir
        found = load_latest(root)
        if found is None:
            raise FileNotFoundError(f"no complete checkpoint (step_N with a valid manifest) in {root}")
        self.last_restore_note = found.note
        state = torch.load(found.path / "trainer_state.pt", map_location="cpu", weights_only=False)
        if state.get("mode") != self.mode:
            log.warning("checkpoint %s was trained with algo.mode=%s; continuing with %s",
                        found.path, state.get("mode"), self.mode)
        if is_sharded_checkpoint(found.path):  # any world size, also a single process (DCP reshards)
            load_dcp(found.path / DCP_DIR, model=self.model, optimizer=self.optimizer)
        elif self.sharded:
            raise NotImplementedError(
                f"{found.path} was written by a single-process learner (model/ + optimizer.pt); a sharded learner "
                f"resumes only from torch.distributed.checkpoint checkpoints (step_N/{DCP_DIR})")
        else:
            load_weights_into(self.model, found.path / "model" / "model.safetensors")
            self.optimizer.load_state_dict(torch.load(found.path / "optimizer.pt", map_location=self.device))
        self.scheduler.load_state_dict(torch.load(found.path / "scheduler.pt", map_location="cpu"))
        self.step = int(state["step"])
        self.version = int(state["version"])
        restore_rng_state(state["rng"])
        # Weight files newer than the checkpoint belong to the lost timeline; the next steps
        # will publish different weights under those numbers. Trajectories generated with them
        # must be discarded by the driver (their behaviour version is > the restored version).
        if self.rank == 0:
            for v in list_weight_versions(self.weights_dir):
                if v > self.version:
                    weight_file_path(self.weights_dir, v).unlink(missing_ok=True)
        if self.sharded:
            torch.distributed.barrier()
        if self.version not in list_weight_versions(self.weights_dir):
            self.publish_weights()
        return dict(state.get("extra") or {})


def _merge_rank_metrics(loss_total: float, agg: dict[str, float]) -> tuple[float, dict[str, float]]:
    """Sum the per-rank loss and token-weighted metrics over the process group (`*_max`: max)."""
    gathered: list[Any] = [None] * process_group.world_size()
    torch.distributed.all_gather_object(gathered, (loss_total, agg))
    total = 0.0
    merged: dict[str, float] = {}
    for loss_r, agg_r in gathered:
        total += loss_r
        for key, val in agg_r.items():
            if key.endswith("_max"):
                merged[key] = max(merged.get(key, float("-inf")), val)
            else:
                merged[key] = merged.get(key, 0.0) + val
    return total, merged


def _is_number(v: Any) -> bool:
    if isinstance(v, torch.Tensor):
        return v.numel() == 1
    return isinstance(v, (int, float)) and not isinstance(v, bool)
