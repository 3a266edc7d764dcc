"""Weight sync: the `collective` transport (gloo/NCCL broadcast) vs the `file` transport, same models, same process.

    python -m experiments.bench.weight_sync [--models tiny 0.5b] [--repeats 3] [--bucket-mb 256] [--backend auto]

Two Ray actors: a sender holding a randomly initialised Qwen2 (the learner's
side of `tepo_ray.weights`) and a receiver holding the same architecture (what
the hf engine and the scorer do on receipt). One sync = the sender publishes the
full state dict and the receiver loads every tensor into its model in place:

* `collective`: `CollectiveTransport.send` (bucketed broadcast on a 2-rank group)
  while the receiver runs `receive` + `load_named_tensors`, both started at once;
* `file` (baseline): the sender writes `v{N}.safetensors` (`FileTransport.send`,
  atomic write), then the receiver reads it and loads it.

Time is wall time from the first call to the receiver's last copy, median over
`--repeats` after one warm-up sync; MB/s = state-dict bytes / time. The ratio
printed is file time / collective time (> 1: the collective is faster). Models:
`tiny` = the benches' tiny Qwen2 shape (tiny_model.py), `0.5b` = Qwen2-0.5B's
shape (24 layers, 896 wide, 151,936 vocab, tied embeddings, ~494M parameters,
fp32). On GPUs (`--backend nccl`, actors with one GPU each) the same command
measures NCCL; the file baseline then includes the device->host copy.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from typing import Any

MODELS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                 intermediate_size=256, vocab_size=384, tie_word_embeddings=False),
    "0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True),
}


def _build(shape: dict[str, Any], *, init: bool, device: str) -> Any:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(max_position_embeddings=512, **shape)
    torch.manual_seed(0)
    if init:
        return Qwen2ForCausalLM(cfg).to(device).eval()
    with torch.device("meta"):  # the receiver's values are overwritten: allocate without initialising
        model = Qwen2ForCausalLM(cfg)
    model = model.to_empty(device=device).eval()
    model.tie_weights()  # to_empty allocates each module's parameter anew, which unties lm_head
    return model


class Sender:
    def __init__(self, shape: dict[str, Any], bucket_mb: float, device: str) -> None:
        from tepo_ray.weights.collective import CollectiveTransport
        from tepo_ray.weights.file import FileTransport

        self.model = _build(shape, init=True, device=device)
        self.dir = tempfile.mkdtemp(prefix="weight_sync_bench_")
        self.collective = CollectiveTransport(bucket_bytes=int(bucket_mb * 2**20))
        self.file = FileTransport(weights_dir=self.dir, keep=1)

    def open(self, backend: str) -> dict:
        import ray

        from tepo_ray.weights import group

        return group.open_endpoint(name="bench", host=ray.util.get_node_ip_address(), world_size=2,
                                   backend=backend, timeout_s=600).to_dict()

    def join(self, info: dict) -> None:
        from tepo_ray.weights import group

        dev = next(self.model.parameters()).device
        group.join(info, rank=0, device=dev if dev.type == "cuda" else None)
        self.collective.group_name = info["name"]

    def update(self, kind: str, version: int) -> dict:
        return getattr(self, kind).describe(self.model, version=version).to_dict()

    def send(self, kind: str, update: dict) -> float:
        from tepo_ray.weights import WeightUpdate

        t0 = time.perf_counter()
        getattr(self, kind).send(WeightUpdate.from_dict(update), self.model)
        return time.perf_counter() - t0

    def cleanup(self) -> None:
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)


class Receiver:
    def __init__(self, shape: dict[str, Any], device: str) -> None:
        self.model = _build(shape, init=False, device=device)

    def join(self, info: dict) -> None:
        from tepo_ray.weights import group

        dev = next(self.model.parameters()).device
        group.join(info, rank=1, device=dev if dev.type == "cuda" else None)

    def receive(self, update: dict) -> float:
        """Receive and load; returns the time.time() when the last tensor was in place."""
        from tepo_ray.weights import load_named_tensors, receive

        with receive(update) as named:
            load_named_tensors(self.model, named, what="bench update")
        if next(self.model.parameters()).is_cuda:
            import torch

            torch.cuda.synchronize()
        return time.time()

    def checksum(self) -> float:
        return float(sum(p.double().sum() for p in self.model.parameters()))


def bench_model(name: str, *, repeats: int, bucket_mb: float, backend: str, gpus: float) -> dict[str, Any]:
    import ray

    from tepo_ray.weights import WeightUpdate
    from tepo_ray.weights.group import resolve_backend

    device = "cuda" if gpus > 0 else "cpu"
    shape = MODELS[name]
    sender = ray.remote(Sender).options(num_cpus=1, num_gpus=gpus).remote(shape, bucket_mb, device)
    receiver = ray.remote(Receiver).options(num_cpus=1, num_gpus=gpus).remote(shape, device)
    try:
        info = ray.get(sender.open.remote(resolve_backend(backend) if backend != "auto" else
                                          ("nccl" if gpus > 0 else "gloo")))
        ray.get([sender.join.remote(info), receiver.join.remote(info)])
        nbytes = WeightUpdate.from_dict(ray.get(sender.update.remote("collective", 0))).nbytes
        times: dict[str, list[float]] = {"collective": [], "file": []}
        version = 0
        for rep in range(repeats + 1):
            for kind in ("collective", "file"):
                version += 1
                update = ray.get(sender.update.remote(kind, version))
                t0 = time.time()
                if kind == "collective":  # sender and receiver at once
                    _, t_end = ray.get([sender.send.remote(kind, update), receiver.receive.remote(update)])
                else:  # write, then read
                    ray.get(sender.send.remote(kind, update))
                    t_end = ray.get(receiver.receive.remote(update))
                if rep > 0:  # the first round warms both paths up
                    times[kind].append(t_end - t0)
        ray.get(sender.cleanup.remote())
    finally:
        ray.kill(sender)
        ray.kill(receiver)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"model": name, "params_m": nbytes / 4 / 1e6, "mb": nbytes / 2**20,
            **{f"{k}_s": med[k] for k in med}, **{f"{k}_mb_s": nbytes / 2**20 / med[k] for k in med},
            "ratio": med["file"] / med["collective"], "runs": {k: [round(x, 4) for x in v] for k, v in times.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["tiny", "0.5b"], choices=sorted(MODELS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bucket-mb", type=float, default=256.0)
    ap.add_argument("--backend", default="auto", choices=["auto", "gloo", "nccl"])
    ap.add_argument("--gpus", type=float, default=0.0, help="GPUs per actor (1 for NCCL on a GPU node)")
    ap.add_argument("--address", default=None, help="Ray cluster address (default: a local Ray)")
    args = ap.parse_args()

    import ray

    ray.init(address=args.address, include_dashboard=False, log_to_driver=False,
             **({} if args.address else {"num_cpus": 2, "object_store_memory": 256 * 2**20}))
    try:
        print(f"{'model':<6} {'params':>8} {'MB':>8} {'collective s':>13} {'MB/s':>8} {'file s':>8} {'MB/s':>8} "
              f"{'file/collective':>16}")
        for name in args.models:
            r = bench_model(name, repeats=args.repeats, bucket_mb=args.bucket_mb, backend=args.backend,
                            gpus=args.gpus)
            print(f"{r['model']:<6} {r['params_m']:>7.1f}M {r['mb']:>8.1f} {r['collective_s']:>13.3f} "
                  f"{r['collective_mb_s']:>8.0f} {r['file_s']:>8.3f} {r['file_mb_s']:>8.0f} {r['ratio']:>15.2f}x",
                  flush=True)
            print(f"       runs (s): {r['runs']}", flush=True)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
