"""Token entropy, segment entropy and ΔH (DESIGN.md section 1).

* ``H_t = -Σ_v π(v|h_t) log π(v|h_t)`` over the *full* vocabulary, exact, from the
  behaviour policy's logits. Computed in float32 chunks of tokens so the extra
  memory is one ``[chunk, V]`` float32 buffer, reused across chunks, whatever the
  number of tokens (``experiments/bench/entropy_memory.py`` measures it). Reusing
  one buffer also avoids the page faults of fresh ``[T, V]`` allocations, which is
  why the chunked pass is faster than a full softmax on CPU.
* ``mean H`` over a reasoning segment ``r_{i,k}`` (optionally its first W tokens).
* ``ΔH_k = mean H(r_{i,k+1}) - mean H(r_{i,k})`` and ``I_{i,k} = 1[ΔH_k < 0]``.

How one chunk is computed (x: logits of c tokens, float32)::

    m   = max_v x                      # [c]   (-inf rows: m := 0)
    e   = exp(x - m)                   # [c,V] the only large buffer, in place
    S   = Σ_v e                        # [c]
    H   = log S + Σ_v entr(e) / S      # entr(e) = -e log e, entr(0) = 0
    log π(y) = x_y - m - log S

``H = log S - Σ e (x-m) / S`` is ``-Σ p log p`` with ``p = e / S``; writing
``-e (x-m)`` as ``entr(e)`` makes a masked logit (``x = -inf`` -> ``e = 0``)
contribute exactly 0 instead of ``0 * -inf = NaN``. Logits of 1e4 are fine
because of the max shift. A row whose logits are all ``-inf`` has ``S = 0``: its
entropy is defined as 0 and its target log-prob as ``-inf``. NaN or ``+inf`` logits
are invalid input and give NaN.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor

__all__ = [
    "token_entropy",
    "token_logprobs_and_entropy",
    "segment_entropy",
    "delta_entropy",
    "entropy_decreased",
]

# 256 tokens x 151936 vocab = 149 MiB of buffer: <= 1/8 of the naive softmax's extra memory and faster than it
# at T = 4096 for float32 and bfloat16 (experiments/bench/entropy_memory.py).
DEFAULT_CHUNK_SIZE = 256


def _check_chunk_size(chunk_size: int) -> None:
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size <= 0:
        raise ValueError(f"chunk_size={chunk_size!r}: expected a positive int")


def _row_blocks(logits: Tensor) -> Iterator[tuple[int, Tensor]]:
    """Yield ``(first_flat_row, block [n, V])`` covering ``logits[..., V]`` row-major.

    A view whenever possible: a non-contiguous ``[B, T, V]`` (e.g. ``logits[:, :-1]``)
    is walked one leading index at a time instead of being copied by ``reshape``.
    """
    vocab = logits.shape[-1]
    if logits.dim() <= 2:
        yield 0, logits.reshape(-1, vocab)
        return
    try:
        yield 0, logits.view(-1, vocab)
        return
    except RuntimeError:
        pass
    inner = logits[0].numel() // vocab if logits.shape[0] > 0 else 0
    for i in range(logits.shape[0]):
        for offset, block in _row_blocks(logits[i]):
            yield i * inner + offset, block


def _chunked(logits: Tensor, targets: Tensor | None, chunk_size: int) -> tuple[Tensor, Tensor | None]:
    """Shared chunked pass; returns flat ``entropy [N]`` and ``logprobs [N]`` (or None)."""
    _check_chunk_size(chunk_size)
    if logits.dim() < 1:
        raise ValueError("logits must have a vocabulary dimension: expected shape [..., V]")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a floating tensor, got dtype {logits.dtype}")
    vocab = logits.shape[-1]
    if vocab == 0:
        raise ValueError("logits have an empty vocabulary dimension (V = 0)")
    n_rows = logits.numel() // vocab
    device = logits.device
    entropy = torch.empty(n_rows, dtype=torch.float32, device=device)
    logprobs = None
    flat_targets = None
    if targets is not None:
        if tuple(targets.shape) != tuple(logits.shape[:-1]):
            raise ValueError(
                f"targets shape {tuple(targets.shape)} must equal logits shape without the vocab dim "
                f"{tuple(logits.shape[:-1])}"
            )
        flat_targets = targets.reshape(-1).to(device=device, dtype=torch.long)
        if n_rows and (int(flat_targets.min()) < 0 or int(flat_targets.max()) >= vocab):
            raise ValueError(f"targets must lie in [0, {vocab}); got range "
                             f"[{int(flat_targets.min())}, {int(flat_targets.max())}]")
        logprobs = torch.empty(n_rows, dtype=torch.float32, device=device)
    if n_rows == 0:
        return entropy, logprobs

    buf = torch.empty(min(chunk_size, n_rows), vocab, dtype=torch.float32, device=device)  # [c, V]
    for base, block in _row_blocks(logits):
        for lo in range(0, block.shape[0], chunk_size):
            x = block[lo : lo + chunk_size]  # [c, V] view of the input
            c = x.shape[0]
            e = buf[:c]
            m = x.amax(dim=-1, keepdim=True).float()  # [c, 1]
            m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
            if x.dtype == torch.float32:
                torch.sub(x, m, out=e)
            else:  # upcast into the buffer (a mixed-dtype sub with out= is ~10x slower on CPU)
                e.copy_(x).sub_(m)
            torch.exp(e, out=e)
            s = e.sum(dim=-1)  # [c]
            log_s = s.log()  # -inf for an all -inf row
            torch.special.entr(e, out=e)
            h = log_s + e.sum(dim=-1) / s
            rows = slice(base + lo, base + lo + c)
            entropy[rows] = torch.where(s > 0, h, torch.zeros_like(h))
            if logprobs is not None:
                tgt = flat_targets[rows].unsqueeze(-1)  # [c, 1]
                lp = x.gather(-1, tgt).squeeze(-1).float() - m.squeeze(-1) - log_s
                logprobs[rows] = torch.where(s > 0, lp, torch.full_like(lp, float("-inf")))
    return entropy, logprobs


@torch.no_grad()
def token_entropy(logits: Tensor, *, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Tensor:
    """Exact full-vocabulary entropy of every position.

    Args:
        logits: ``[..., V]`` (float32 / bfloat16 / float16; any device).
        chunk_size: tokens per chunk; extra memory is ``chunk_size * V * 4`` bytes.

    Returns:
        ``[...]`` float32 entropies in nats. All ``-inf`` row -> 0 (see module doc).
    """
    entropy, _ = _chunked(logits, None, chunk_size)
    return entropy.view(logits.shape[:-1])


@torch.no_grad()
def token_logprobs_and_entropy(
    logits: Tensor, targets: Tensor, *, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> tuple[Tensor, Tensor]:
    """Log-prob of the target token and the entropy, in one chunked pass (no grad).

    Args:
        logits: ``[T, V]`` or ``[B, T, V]`` (any ``[..., V]``); position t predicts ``targets[..., t]``.
        targets: ``[T]`` / ``[B, T]`` token ids (already shifted by the caller).

    Returns:
        ``(logprobs, entropy)``, both float32 with the shape of ``targets``.
    """
    entropy, logprobs = _chunked(logits, targets, chunk_size)
    assert logprobs is not None
    shape = logits.shape[:-1]
    return logprobs.view(shape), entropy.view(shape)


def segment_entropy(entropies: Tensor, spans: Tensor, *, window: int | None = None) -> Tensor:
    """Mean token entropy over each reasoning segment (the ``mean H(r_{i,k})`` of ΔH).

    Args:
        entropies: ``[T]`` (or ``[B, T]``) per-token entropies.
        spans: ``[K, 2]`` (or ``[B, K, 2]``) long ``(start, end)``, end exclusive.
        window: if set, only the first ``window`` tokens of each span count
            (``algo.entropy_window``); ``None`` = whole span.

    Returns:
        ``[K]`` (or ``[B, K]``) float32 means; an empty span gives NaN (ΔH undefined).
        Uses a float64 prefix sum, so no loop over tokens or segments.
    """
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window <= 0):
        raise ValueError(f"window={window!r}: expected None or a positive int")
    if spans.dim() != entropies.dim() + 1 or spans.shape[-1] != 2 or spans.shape[:-2] != entropies.shape[:-1]:
        raise ValueError(
            f"spans shape {tuple(spans.shape)} does not match entropies shape {tuple(entropies.shape)}: "
            "expected entropies [T] with spans [K, 2], or entropies [B, T] with spans [B, K, 2]"
        )
    if spans.is_floating_point():
        raise ValueError(f"spans must be an integer tensor (start, end), got dtype {spans.dtype}")
    T = entropies.shape[-1]
    spans = spans.to(device=entropies.device, dtype=torch.long)
    start, end = spans[..., 0], spans[..., 1]  # [..., K]
    if spans.numel() and (bool((start < 0).any()) or bool((end > T).any()) or bool((start > end).any())):
        raise ValueError(f"spans must satisfy 0 <= start <= end <= T={T}; got {spans.tolist()}")
    if window is not None:
        end = torch.minimum(end, start + window)
    csum = torch.nn.functional.pad(entropies.double().cumsum(-1), (1, 0))  # [..., T+1]
    total = csum.gather(-1, end) - csum.gather(-1, start)
    count = (end - start).double()
    mean = torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, float("nan")))
    return mean.float()


def delta_entropy(segment_means: Tensor) -> Tensor:
    """``ΔH_k = mean H(r_{k+1}) - mean H(r_k)`` for ``k = 0..K-2``.

    Segment k ends with tool call k; segment k+1 follows observation k. For a
    trajectory with n calls pass n + 1 segment means; when it was cut right after a
    call, pass an empty span (mean NaN) for the missing segment so the result has one
    ΔH per call, the last one NaN.

    Args:
        segment_means: ``[K]`` (or ``[B, K]``).
    Returns:
        ``[K-1]`` (or ``[B, K-1]``); NaN wherever either mean is NaN.
    """
    if segment_means.dim() == 0:
        raise ValueError("segment_means must have a segment dimension: expected shape [K] or [B, K]")
    if segment_means.shape[-1] == 0:
        return segment_means.new_empty(*segment_means.shape[:-1], 0)
    return segment_means[..., 1:] - segment_means[..., :-1]


def entropy_decreased(delta: Tensor) -> Tensor:
    """``I_{i,k} = 1[ΔH_k < 0]`` as a bool tensor.

    An undefined ΔH (NaN, e.g. the trajectory ends right after a call) is *not*
    counted as decreasing: it contributes to n but not to m in the sparse reward,
    and gets no α bonus in the dense reward.
    """
    return delta < 0  # NaN < 0 is False
