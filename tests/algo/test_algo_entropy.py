"""Exact chunked token entropy, segment means, ΔH (tepo_ray.algo.entropy)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tepo_ray.algo import delta_entropy, entropy_decreased, segment_entropy, token_entropy
from tepo_ray.algo.entropy import token_logprobs_and_entropy

NEG_INF = float("-inf")


def naive_entropy_f64(logits: torch.Tensor) -> torch.Tensor:
    """Reference: full float64 softmax per row, skipping p == 0 terms; all -inf row -> 0."""
    flat = logits.double().reshape(-1, logits.shape[-1])
    out = []
    for row in flat:
        if torch.isneginf(row).all():
            out.append(0.0)
            continue
        p = torch.softmax(row, -1)
        logp = torch.log_softmax(row, -1)
        keep = p > 0
        out.append(float(-(p[keep] * logp[keep]).sum()))
    return torch.tensor(out, dtype=torch.float64).reshape(logits.shape[:-1])


def awkward_logits(T: int = 37, V: int = 211, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, V, generator=g) * 3
    x[0, : V // 2] = NEG_INF  # half the vocabulary masked
    x[1] = NEG_INF  # every entry masked
    x[2] = x[2] * 1e4  # huge logits: near one-hot
    x[3, 5] = 1e4  # one huge logit among normal ones
    x[4] = 0.0  # uniform
    x[5, :-1] = NEG_INF  # only one allowed token
    return x


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 1024])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_float64_reference(chunk_size, dtype):
    x = awkward_logits().to(dtype)
    ref = naive_entropy_f64(x)  # reference on exactly the same (rounded) values
    h = token_entropy(x, chunk_size=chunk_size)
    assert h.dtype == torch.float32 and h.shape == (37,)
    assert not torch.isnan(h).any()
    torch.testing.assert_close(h.double(), ref, atol=2e-5, rtol=1e-5)
    V = x.shape[-1]
    assert h[1] == 0.0  # all -inf row: defined as 0
    assert h[5] == 0.0  # one allowed token: no uncertainty
    assert h[4] == pytest.approx(math.log(V), rel=1e-6)
    assert h[0] == pytest.approx(float(ref[0]), rel=1e-5) and h[0] > 0


def test_batched_and_non_contiguous_inputs_match_2d():
    x = torch.randn(3, 11, 50)
    x[1, 4, :30] = NEG_INF
    flat = token_entropy(x.reshape(-1, 50), chunk_size=4).view(3, 11)
    torch.testing.assert_close(token_entropy(x, chunk_size=4), flat)
    sliced = x[:, :-1]  # non-contiguous [B, T-1, V]
    assert not sliced.is_contiguous()
    torch.testing.assert_close(token_entropy(sliced, chunk_size=4), flat[:, :-1])
    torch.testing.assert_close(token_entropy(x[:, :, :-3], chunk_size=5).double(), naive_entropy_f64(x[:, :, :-3]),
                               atol=2e-5, rtol=1e-5)


def test_no_grad_and_empty():
    x = torch.randn(4, 9, requires_grad=True)
    h = token_entropy(x)
    assert not h.requires_grad
    assert token_entropy(torch.randn(0, 9)).shape == (0,)
    with pytest.raises(ValueError, match="chunk_size"):
        token_entropy(x, chunk_size=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_and_entropy_one_pass(dtype):
    x = awkward_logits(T=23, V=97, seed=1).to(dtype)
    targets = torch.randint(0, 97, (23,), generator=torch.Generator().manual_seed(2))
    targets[0] = 96  # an allowed token in the half-masked row
    targets[5] = 96  # the only allowed token
    lp, h = token_logprobs_and_entropy(x, targets, chunk_size=5)
    ref_lp = torch.log_softmax(x.double(), -1).gather(-1, targets[:, None])[:, 0]
    ok = torch.ones(23, dtype=torch.bool)
    ok[1] = False  # all -inf row
    torch.testing.assert_close(lp[ok].double(), ref_lp[ok], atol=1e-4, rtol=1e-5)
    assert lp[1] == NEG_INF and lp[5] == 0.0
    torch.testing.assert_close(h, token_entropy(x, chunk_size=3))
    # batched [B, T, V] with [B, T] targets
    lp2, h2 = token_logprobs_and_entropy(x.view(1, 23, 97), targets.view(1, 23), chunk_size=4)
    assert lp2.shape == (1, 23)
    torch.testing.assert_close(lp2[0][ok], lp[ok])
    with pytest.raises(ValueError, match="targets"):
        token_logprobs_and_entropy(x, torch.full((23,), 97))
    with pytest.raises(ValueError, match="targets shape"):
        token_logprobs_and_entropy(x, targets[:-1])


@settings(max_examples=30, deadline=None)
@given(
    T=st.integers(1, 9),
    V=st.integers(1, 40),
    scale=st.sampled_from([0.1, 1.0, 30.0, 1e3]),
    chunk=st.integers(1, 10),
    seed=st.integers(0, 2**16),
)
def test_entropy_bounds_property(T, V, scale, chunk, seed):
    x = torch.randn(T, V, generator=torch.Generator().manual_seed(seed)) * scale
    h = token_entropy(x, chunk_size=chunk)
    assert bool((h >= -1e-6).all()) and bool((h <= math.log(V) + 1e-5).all())
    torch.testing.assert_close(h.double(), naive_entropy_f64(x), atol=3e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- segments / ΔH
def test_segment_means_worked_example():
    #          prompt  r_1 (ends with call 0)  obs      r_2 (ends with call 1)  obs   (cut: no r_3)
    ent = torch.tensor([9.0, 9.0, 1.0, 2.0, 3.0, 9.0, 9.0, 0.5, 0.5, 1.0, 9.0])  # [T=11]
    spans = torch.tensor([[2, 5], [7, 10], [11, 11]])  # r_1, r_2, empty r_3
    means = segment_entropy(ent, spans)
    assert means[0] == pytest.approx((1 + 2 + 3) / 3)
    assert means[1] == pytest.approx((0.5 + 0.5 + 1.0) / 3)
    assert math.isnan(means[2])
    windowed = segment_entropy(ent, spans, window=2)
    assert windowed[0] == pytest.approx(1.5) and windowed[1] == pytest.approx(0.5)
    assert math.isnan(windowed[2])
    assert segment_entropy(ent, spans, window=100)[:2].tolist() == pytest.approx(means[:2].tolist())

    delta = delta_entropy(means)  # ΔH_0 = 2/3 - 2 (decreased), ΔH_1 = NaN (cut after call 1)
    assert delta.shape == (2,)
    assert delta[0] == pytest.approx(2 / 3 - 2)
    assert math.isnan(delta[1])
    assert entropy_decreased(delta).tolist() == [True, False]
    up = delta_entropy(torch.tensor([0.5, 0.7, 0.7]))
    assert entropy_decreased(up).tolist() == [False, False]  # increase and no change are not decreases


def test_segment_entropy_batched_matches_rows_and_rejects_bad_spans():
    ent = torch.rand(3, 20)
    spans = torch.tensor([[[0, 4], [6, 9]], [[1, 2], [2, 20]], [[5, 5], [7, 19]]])
    batched = segment_entropy(ent, spans, window=3)
    for b in range(3):
        torch.testing.assert_close(batched[b], segment_entropy(ent[b], spans[b], window=3), equal_nan=True)
    torch.testing.assert_close(batched[1, 1], ent[1, 2:5].mean())
    assert delta_entropy(batched).shape == (3, 1)
    with pytest.raises(ValueError, match="start <= end"):
        segment_entropy(ent[0], torch.tensor([[5, 3]]))
    with pytest.raises(ValueError, match="end <= T"):
        segment_entropy(ent[0], torch.tensor([[0, 21]]))
    with pytest.raises(ValueError, match="window"):
        segment_entropy(ent[0], torch.tensor([[0, 2]]), window=0)
    with pytest.raises(ValueError, match="spans shape"):
        segment_entropy(ent[0], torch.tensor([0, 2]))
    assert delta_entropy(torch.tensor([1.0])).shape == (0,)
