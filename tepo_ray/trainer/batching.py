"""Right-padded token batches and the teacher-forced per-token forward.

Alignment convention used everywhere in tepo_ray (records, scorer, learner):
a per-token quantity at position t describes token t, i.e. it comes from the
logits at position t-1 (`log pi(token_t | tokens_<t)`, `H_t` of the
distribution token t was drawn from). Position 0 has no logits and is 0.0; the
first token is always a prompt token (loss_mask 0).

The forward runs the model's backbone once and applies the output head only
to the positions that need it (loss_mask == 1), `chunk_size` rows at a time
(with gradient: recomputed in backward, `algo.linear_logprobs`), so exact
full-vocabulary log-probs and entropies cost O(chunk_size x vocab) memory
instead of O(B x T x vocab).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from tepo_ray import algo
from tepo_ray.algo import linear_logprobs as algo_linear

__all__ = [
    "TokenBatch",
    "make_token_batch",
    "pad_values",
    "micro_batch_slices",
    "check_first_token_untrained",
    "token_logprobs",
    "PolicyLogprobs",
]


@dataclass
class TokenBatch:
    """A right-padded batch of sequences.

    input_ids:      [B, T] long, padded with `pad_id`
    attention_mask: [B, T] long, 1 on real tokens
    loss_mask:      [B, T] float, 1 on trained (model-generated) tokens, 0 on prompt/observation/padding
    lengths:        [B] long, real length of each sequence
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    lengths: torch.Tensor

    @property
    def num_tokens(self) -> int:
        """Trained tokens in the batch (sum of loss_mask)."""
        return int(self.loss_mask.sum().item())

    def to(self, device: str | torch.device) -> "TokenBatch":
        return TokenBatch(
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            loss_mask=self.loss_mask.to(device),
            lengths=self.lengths.to(device),
        )


def pad_values(
    rows: Sequence[Sequence[float]] | Sequence[Sequence[int]],
    *,
    length: int | None = None,
    pad_value: float = 0.0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Right-pad variable-length rows into a [B, length] tensor (length = longest row when None)."""
    t_max = max((len(r) for r in rows), default=0) if length is None else length
    out = torch.full((len(rows), t_max), pad_value, dtype=dtype)  # [B, T]
    for i, r in enumerate(rows):
        if len(r) > t_max:
            raise ValueError(f"row {i} has {len(r)} entries; longer than the padded length {t_max}")
        if len(r):
            out[i, : len(r)] = torch.as_tensor(list(r), dtype=dtype)
    return out


def make_token_batch(
    token_ids: Sequence[Sequence[int]],
    loss_masks: Sequence[Sequence[int]],
    *,
    pad_id: int = 0,
    length: int | None = None,
) -> TokenBatch:
    """Right-pad token ids and loss masks into a `TokenBatch`."""
    if len(token_ids) != len(loss_masks):
        raise ValueError(f"{len(token_ids)} token sequences but {len(loss_masks)} loss masks")
    for i, (ids, mask) in enumerate(zip(token_ids, loss_masks)):
        if len(ids) != len(mask):
            raise ValueError(f"sequence {i}: token_ids has {len(ids)} entries, loss_mask {len(mask)}")
        if len(ids) == 0:
            raise ValueError(f"sequence {i} is empty; expected at least one (prompt) token")
    lengths = torch.tensor([len(ids) for ids in token_ids], dtype=torch.long)  # [B]
    input_ids = pad_values(token_ids, length=length, pad_value=pad_id, dtype=torch.long)  # [B, T]
    attention_mask = (torch.arange(input_ids.shape[1])[None, :] < lengths[:, None]).long()  # [B, T]
    loss_mask = pad_values(loss_masks, length=length, pad_value=0.0, dtype=torch.float32)  # [B, T]
    return TokenBatch(input_ids=input_ids, attention_mask=attention_mask, loss_mask=loss_mask, lengths=lengths)


def micro_batch_slices(n: int, size: int) -> list[slice]:
    """Consecutive slices of at most `size` covering range(n)."""
    if size < 1:
        raise ValueError(f"micro-batch size must be >= 1, got {size}")
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def check_first_token_untrained(loss_mask: Sequence[int], *, what: str) -> None:
    """Position 0 has no logits, so it cannot carry a log-prob, entropy or loss."""
    if len(loss_mask) and loss_mask[0]:
        raise ValueError(
            f"{what}: loss_mask[0] is 1, but the first token has no preceding context to predict it from; "
            f"expected at least one prompt token with loss_mask 0"
        )


def _backbone_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    backbone = getattr(model, "base_model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if backbone is None or backbone is model or head is None:
        raise TypeError(
            f"{type(model).__name__} does not expose a backbone (`base_model`) and an output head "
            f"(`get_output_embeddings()`); expected a Hugging Face *ForCausalLM model"
        )
    cfg = getattr(model, "config", None)
    for attr in ("final_logit_softcapping", "logit_scale"):
        if cfg is not None and getattr(cfg, attr, None) not in (None, 1.0):
            raise NotImplementedError(f"{type(model).__name__} post-processes logits ({attr}); not supported")
    return backbone, head


class PolicyLogprobs(torch.nn.Module):
    """A causal LM viewed as "token ids -> per-token log-probs (and entropies)".

    Wraps a Hugging Face *ForCausalLM without copying it (`self.model` is the
    same object). Having the whole computation in one `forward` matters for
    FSDP2: the wrapper is the root `fully_shard` unit, so the embedding, final
    norm and output head are gathered by its hooks before the backbone and the
    head are called. The output head is applied with `algo.linear_logprobs`
    (chunked, recomputed in backward), so no [tokens x vocab] tensor exists.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        _backbone_and_head(model)  # fail early on an unsupported model
        self.model = model

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        loss_mask: torch.Tensor,
        *,
        chunk_size: int,
        temperature: float = 1.0,
        with_entropy: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logprobs [B, T], entropy [B, T] or None) at every position with loss_mask == 1, 0.0 elsewhere."""
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        backbone, head = _backbone_and_head(self.model)
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask,
                          use_cache=False).last_hidden_state  # [B, T, H]
        target_mask = loss_mask[:, 1:] > 0  # [B, T-1]: position t+1 is predicted from hidden t
        rows = hidden[:, :-1][target_mask]  # [N, H]
        targets = input_ids[:, 1:][target_mask]  # [N]
        weight = head.weight  # [V, H]
        bias = getattr(head, "bias", None)
        if torch.is_grad_enabled():
            lp_flat, ent_flat = algo_linear.linear_logprobs(
                rows, weight, targets, bias=bias, temperature=temperature, chunk_size=chunk_size,
                with_entropy=with_entropy,
            )  # [N], [N] | None
        else:
            lp_parts, ent_parts = [], []
            for s in range(0, max(rows.shape[0], 1), chunk_size):
                logits = torch.nn.functional.linear(rows[s : s + chunk_size], weight, bias).float()  # [c, V]
                if temperature != 1.0:
                    logits = logits / temperature
                lp, ent = algo.token_logprobs_and_entropy(logits, targets[s : s + chunk_size], chunk_size=chunk_size)
                lp_parts.append(lp)
                ent_parts.append(ent)
            lp_flat, ent_flat = torch.cat(lp_parts), torch.cat(ent_parts)  # [N], [N]
        full_mask = torch.zeros_like(input_ids, dtype=torch.bool)  # [B, T]
        full_mask[:, 1:] = target_mask
        logprobs = torch.zeros(full_mask.shape, dtype=lp_flat.dtype, device=lp_flat.device).masked_scatter(
            full_mask, lp_flat)  # [B, T]
        if not with_entropy:
            return logprobs, None
        ent_flat = ent_flat.detach()
        entropy = torch.zeros(full_mask.shape, dtype=ent_flat.dtype, device=ent_flat.device).masked_scatter(
            full_mask, ent_flat)  # [B, T]
        return logprobs, entropy


def token_logprobs(
    model: torch.nn.Module,
    batch: TokenBatch,
    *,
    chunk_size: int,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Teacher-forced log pi(token_t | tokens_<t) and H_t at every trained position, in one forward.

    `model` is a Hugging Face *ForCausalLM or a `PolicyLogprobs` over one (e.g. FSDP-sharded).
    Returns (logprobs [B, T], entropy [B, T] or None), 0.0 wherever loss_mask == 0.
    Logits are divided by `temperature` (the sampling distribution). Differentiable
    w.r.t. the model parameters when grad is enabled; either way the output head
    is applied `chunk_size` rows at a time, so memory is O(chunk_size x vocab)
    (with grad: `algo.linear_logprobs` recomputes the chunk's logits in backward).
    """
    policy = model if isinstance(model, PolicyLogprobs) else PolicyLogprobs(model)
    device = next(policy.parameters()).device
    batch = batch.to(device)
    return policy(batch.input_ids, batch.attention_mask, batch.loss_mask, chunk_size=chunk_size,
                  temperature=temperature, with_entropy=with_entropy)
