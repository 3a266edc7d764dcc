"""Right-padded batches and the teacher-forced forward: alignment, padding and chunking invariance."""

from __future__ import annotations

import pytest
import torch

from tepo_ray.trainer.batching import make_token_batch, micro_batch_slices, pad_values, token_logprobs
from tepo_ray.trainer.checkpoint import load_policy

from trainer_factories import make_trajectory


def test_pad_and_slices() -> None:
    out = pad_values([[1, 2], [3]], pad_value=-1, dtype=torch.long)
    assert out.tolist() == [[1, 2], [3, -1]]
    assert micro_batch_slices(5, 2) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    batch = make_token_batch([[5, 6, 7], [8]], [[0, 1, 1], [0]], pad_id=3)
    assert batch.input_ids.tolist() == [[5, 6, 7], [8, 3, 3]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch.num_tokens == 2
    with pytest.raises(ValueError, match="sequence 1: token_ids has 1 entries, loss_mask 2"):
        make_token_batch([[1], [2]], [[0], [0, 1]])


def test_logprobs_match_plain_forward_regardless_of_padding_and_chunks(tiny_model: str) -> None:
    model = load_policy(tiny_model).eval()
    trajs = [make_trajectory(uid=str(i), prompt_len=3 + i, gen_lens=(4 + 2 * i, 3), obs_lens=(2,), seed=i)
             for i in range(3)]
    batch = make_token_batch([t.token_ids for t in trajs], [t.loss_mask for t in trajs])
    with torch.no_grad():
        lp_a, ent_a = token_logprobs(model, batch, chunk_size=1, with_entropy=True)
        lp_b, ent_b = token_logprobs(model, batch, chunk_size=4096, with_entropy=True)
    assert torch.allclose(lp_a, lp_b, atol=1e-6) and torch.allclose(ent_a, ent_b, atol=1e-6)
    lp_grad, _ = token_logprobs(model, batch, chunk_size=3)  # differentiable path
    assert lp_grad.requires_grad
    assert torch.allclose(lp_grad.detach(), lp_a, atol=1e-5)

    for i, t in enumerate(trajs):
        with torch.no_grad():
            logp = model(torch.tensor([t.token_ids])).logits[0].double().log_softmax(-1)  # [T, V] unpadded
        for pos, m in enumerate(t.loss_mask):
            if m:
                assert lp_a[i, pos].item() == pytest.approx(logp[pos - 1, t.token_ids[pos]].item(), abs=1e-5)
            else:
                assert lp_a[i, pos].item() == 0.0 and ent_a[i, pos].item() == 0.0
        assert torch.all(lp_a[i, len(t.token_ids):] == 0)


def test_temperature_scales_logits(tiny_model: str) -> None:
    model = load_policy(tiny_model).eval()
    t = make_trajectory(uid="a", seed=3)
    batch = make_token_batch([t.token_ids], [t.loss_mask])
    with torch.no_grad():
        _, ent1 = token_logprobs(model, batch, chunk_size=8, with_entropy=True)
        _, ent_hot = token_logprobs(model, batch, chunk_size=8, temperature=2.0, with_entropy=True)
    m = batch.loss_mask > 0
    assert torch.all(ent_hot[m] > ent1[m])  # a hotter distribution has higher entropy
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(model, batch, chunk_size=8, temperature=0.0)
