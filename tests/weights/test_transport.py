"""tepo_ray.weights pieces without an engine: bucket plans, packing, and a real gloo broadcast between Ray actors."""

from __future__ import annotations

import sys

import pytest
import torch

from tepo_ray.weights import ParamMeta, WeightUpdate, iter_full_state, param_metadata
from tepo_ray.weights.buckets import pack_bucket, plan_buckets, unpack_bucket


def _tied_model() -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                        num_key_value_heads=1, intermediate_size=64, vocab_size=50,
                                        tie_word_embeddings=True))


def test_plan_buckets_bounds_bytes_and_keeps_order() -> None:
    params = [ParamMeta(f"p{i}", (n,), "float32") for i, n in enumerate([10, 10, 30, 5, 5, 5, 1])]  # bytes 4n
    plan = plan_buckets(params, bucket_bytes=80)
    assert plan == [[0, 1], [2], [3, 4, 5, 6]]  # 120 B alone (oversized), the rest packed <= 80 B
    assert [i for b in plan for i in b] == list(range(len(params)))
    with pytest.raises(ValueError, match="bucket_bytes"):
        plan_buckets(params, bucket_bytes=0)


def test_pack_unpack_round_trips_mixed_dtypes() -> None:
    tensors = [torch.randn(3, 4), torch.arange(6, dtype=torch.int64).reshape(2, 3), torch.randn(5).bfloat16()]
    metas = [ParamMeta(f"t{i}", tuple(t.shape), str(t.dtype).removeprefix("torch.")) for i, t in enumerate(tensors)]
    buf = pack_bucket(tensors, nbytes=sum(m.nbytes for m in metas), device="cpu")
    out = dict(unpack_bucket(buf.clone(), metas))
    for m, t in zip(metas, tensors):
        assert out[m.name].dtype == t.dtype and torch.equal(out[m.name], t)


def test_full_state_skips_tied_aliases_and_receivers_retie() -> None:
    from tepo_ray.weights import load_named_tensors

    model = _tied_model()
    items = list(iter_full_state(model))
    names = [n for n, _ in items]
    assert names == [m.name for m in param_metadata(model)]
    assert "lm_head.weight" in model.state_dict() and "lm_head.weight" not in names  # tied: sent once
    target = _tied_model()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert load_named_tensors(target, iter(list(iter_full_state(model))), what="t") == len(names)
    assert torch.equal(target.lm_head.weight, model.lm_head.weight)  # re-tied through the shared parameter
    with pytest.raises(ValueError, match="missing"):
        load_named_tensors(target, iter(items[1:]), what="partial")


def test_update_round_trips_and_rejects_incomplete() -> None:
    u = WeightUpdate(kind="collective", version=3, group="g", params=param_metadata(_tied_model()), bucket_bytes=1024)
    assert WeightUpdate.from_dict(u.to_dict()) == u
    with pytest.raises(ValueError, match="collective"):
        WeightUpdate(kind="collective", version=1, group="g", params=[], bucket_bytes=1)
    with pytest.raises(ValueError, match="unknown"):
        WeightUpdate(kind="rdma", version=1)


def _actor_classes():
    class Sender:
        def __init__(self) -> None:
            from tepo_ray.weights.collective import CollectiveTransport

            self.model = _tied_model()
            with torch.no_grad():
                for p in self.model.parameters():
                    p.add_(1.0)  # not what a receiver starts with
            self.transport = CollectiveTransport(bucket_bytes=4096)

        def open(self, world: int) -> dict:
            from tepo_ray.weights import group

            return group.open_endpoint(name="t", host="127.0.0.1", world_size=world, backend="gloo",
                                       timeout_s=60).to_dict()

        def join(self, info: dict) -> None:
            from tepo_ray.weights import group

            group.join(info, rank=0)
            self.transport.group_name = info["name"]

        def update(self) -> dict:
            return self.transport.describe(self.model, version=1).to_dict()

        def send(self, update: dict) -> int:
            return self.transport.send(WeightUpdate.from_dict(update), self.model)

        def state(self) -> dict:
            return {k: v.clone() for k, v in self.model.state_dict().items()}

    class Receiver:
        def __init__(self) -> None:
            self.model = _tied_model()

        def join(self, info: dict, rank: int) -> None:
            from tepo_ray.weights import group

            group.join(info, rank=rank)

        def receive(self, update: dict, take: int | None = None) -> int:
            from tepo_ray.weights import load_named_tensors, receive

            with receive(update) as named:
                if take is not None:  # consume only part: the context manager must drain the rest
                    return sum(1 for _, _ in zip(range(take), named))
                return load_named_tensors(self.model, named, what="test update")

        def state(self) -> dict:
            return {k: v.clone() for k, v in self.model.state_dict().items()}

    return Sender, Receiver


@pytest.mark.ray
def test_gloo_broadcast_between_ray_actors(ray_sync) -> None:
    import ray

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # test modules are not importable by workers
    Sender, Receiver = _actor_classes()
    sender = ray.remote(num_cpus=0)(Sender).remote()
    receivers = [ray.remote(num_cpus=0)(Receiver).remote() for _ in range(2)]
    try:
        info = ray.get(sender.open.remote(3))
        ray.get([sender.join.remote(info)] + [r.join.remote(info, i + 1) for i, r in enumerate(receivers)], timeout=60)
        update = ray.get(sender.update.remote())
        assert len(plan_buckets(WeightUpdate.from_dict(update).params, bucket_bytes=4096)) > 3  # many buckets
        sent, loaded, partial = ray.get([sender.send.remote(update), receivers[0].receive.remote(update),
                                         receivers[1].receive.remote(update, take=2)], timeout=60)
        assert sent == WeightUpdate.from_dict(update).nbytes and partial == 2
        want = ray.get(sender.state.remote())
        got = ray.get(receivers[0].state.remote())
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
        # the partial receiver drained the rest: the group is still in step for the next update
        ray.get([sender.send.remote(update), receivers[0].receive.remote(update), receivers[1].receive.remote(update)],
                timeout=60)
        got1 = ray.get(receivers[1].state.remote())
        assert all(torch.equal(got1[k], want[k]) for k in want)
    finally:
        for a in [sender, *receivers]:
            ray.kill(a)
