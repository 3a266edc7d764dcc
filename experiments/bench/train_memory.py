"""Peak memory of one training micro-batch: chunked recomputing log-probs vs the naive full-logits path.

    python -m experiments.bench.train_memory [--tokens 4096] [--vocab 151936] [--chunk-size 256]

Model: a small Qwen2 with the Qwen2.5 vocabulary size (hidden 256, 2 layers,
4 heads of 64, untied head; 78M parameters, almost all in the two [V, H]
embeddings), fp32 on CPU, a batch of 2 sequences of `tokens / 2`, every token
after the first 8 trained. One micro-batch = forward, the token-mean policy
loss -sum(logprob * advantage) / N, backward.

Variants (each in its own fresh subprocess):
* naive       — what `token_logprobs` did before: output head on all trained rows at
                once, [N, V] fp32 logits, `cross_entropy`; autograd keeps [N, V] tensors.
* chunked     — `batching.PolicyLogprobs` (`algo.linear_logprobs`): chunk_size rows at a
                time, logits recomputed in backward.
* chunked+gc  — the same with `trainer.gradient_checkpointing` (decoder layers recomputed).

Memory: the process's resident high-water mark (VmHWM, reset via
/proc/self/clear_refs just before the step) minus the resident size before the
step; model weights and the batch exist before and are not counted; parameter
gradients (~300 MB here, the same in every variant) are. Torch's CPU allocator
does not cache and large tensors are mmap-ed, so RSS follows live tensors.

Measured here (2 busy cores, `--tokens 2048`: 2032 trained tokens): naive 4823 MiB,
chunked 693 MiB (0.144), chunked+gc 670 MiB (0.139); loss equal to 6 digits,
max relative gradient difference 5.9e-7.

Target: chunked extra memory <= 1/4 of naive, at equal loss and gradients:
|loss diff| <= 1e-5 relative and every gradient within 1e-4 x (max |grad| of
that tensor) of naive (fp32; only the summation order differs).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

MIB = 2**20


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def _model(vocab: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=512, vocab_size=vocab, max_position_embeddings=8192,
                      tie_word_embeddings=False)
    return Qwen2ForCausalLM(cfg).train()


def _run_variant(variant: str, *, tokens: int, vocab: int, chunk: int, out: Path) -> None:
    from tepo_ray.trainer.batching import make_token_batch, token_logprobs

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    model = _model(vocab)
    if variant == "chunked+gc":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    g = torch.Generator().manual_seed(1)
    seq = tokens // 2
    ids = torch.randint(1, vocab, (2, seq), generator=g).tolist()
    masks = [[0] * 8 + [1] * (seq - 8)] * 2
    batch = make_token_batch(ids, masks)
    adv = torch.randn(2, seq, generator=g) * batch.loss_mask  # [B, T]
    n = batch.num_tokens

    rss0 = _status_bytes("VmRSS")
    _reset_hwm()
    t0 = time.perf_counter()
    if variant == "naive":
        backbone, head = model.base_model, model.get_output_embeddings()
        hidden = backbone(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        sel = batch.loss_mask[:, 1:] > 0  # [B, T-1]
        logits = head(hidden[:, :-1][sel]).float()  # [N, V]
        lp = -torch.nn.functional.cross_entropy(logits, batch.input_ids[:, 1:][sel], reduction="none")  # [N]
        loss = -(lp * adv[:, 1:][sel]).sum() / n
    else:
        lp, _ = token_logprobs(model, batch, chunk_size=chunk)  # [B, T]
        loss = -(lp * adv).sum() / n
    loss.backward()
    elapsed = time.perf_counter() - t0
    peak = _status_bytes("VmHWM")
    torch.save({n_: p.grad for n_, p in model.named_parameters()}, out.with_suffix(".grads.pt"))
    out.write_text(json.dumps({"variant": variant, "extra_bytes": peak - rss0, "seconds": elapsed,
                               "loss": float(loss.detach()), "tokens": n}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--chunk-size", type=int, default=256)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        _run_variant(args.variant, tokens=args.tokens, vocab=args.vocab, chunk=args.chunk_size, out=args.out)
        return
    results, grads = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in ("naive", "chunked", "chunked+gc"):
            out = Path(tmp) / f"{variant}.json"
            subprocess.run([sys.executable, "-m", "experiments.bench.train_memory", "--variant", variant,
                            "--out", str(out), "--tokens", str(args.tokens), "--vocab", str(args.vocab),
                            "--chunk-size", str(args.chunk_size)], check=True)
            results[variant] = json.loads(out.read_text())
            grads[variant] = torch.load(out.with_suffix(".grads.pt"))
    base = results["naive"]
    print(f"one micro-batch: {base['tokens']} trained tokens, vocab {args.vocab}, chunk {args.chunk_size}, "
          f"naive [N, V] fp32 logits = {base['tokens'] * args.vocab * 4 / MIB:.0f} MiB")
    print(f"{'variant':<12} {'extra MiB':>10} {'vs naive':>9} {'time s':>7} {'loss':>12} {'max rel grad diff':>18}")
    ok = True
    for variant, r in results.items():
        rel = max(float((grads[variant][k] - g).abs().max() / g.abs().max().clamp_min(1e-30))
                  for k, g in grads["naive"].items())
        ratio = r["extra_bytes"] / base["extra_bytes"]
        print(f"{variant:<12} {r['extra_bytes'] / MIB:>10.0f} {ratio:>9.3f} {r['seconds']:>7.2f} "
              f"{r['loss']:>12.6f} {rel:>18.2e}")
        if variant != "naive":
            ok &= ratio <= 0.25 and rel <= 1e-4 and abs(r["loss"] - base["loss"]) <= 1e-5 * abs(base["loss"])
    print("target (extra memory <= 1/4 of naive, loss rel 1e-5, grads rel 1e-4):", "met" if ok else "NOT met")


if __name__ == "__main__":
    main()
