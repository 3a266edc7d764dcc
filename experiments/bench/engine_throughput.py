"""Generation throughput: `hf` vs `vllm` engine on the embedded tiny Qwen2.

Samples `--prompts` prompts × `--tokens` new tokens (temperature 1, no stop
tags; a sequence may still end early at EOS, so throughput counts the tokens
actually returned) with each engine in this process, after one warm-up call,
and prints tokens/s per engine and the vllm / hf ratio. Both run with the same
number of torch threads (`--threads`, default 1 = a 1-CPU generation actor; vLLM
serves with 1 thread anyway).

    python -m experiments.bench.engine_throughput [--prompts 64 --tokens 64 --repeats 3]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time

import torch

from tepo_ray.config import EngineConfig, EngineName, ModelConfig
from tepo_ray.engines import GenerationRequest, make_engine, vllm_available
from tepo_ray.models import ensure_model, load_tokenizer


def _corpus(n: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(100, 999), rng.randint(100, 999)
        out.append(f"Question: what is {a} * {b}?\n<think>I need the tool</think><python>print({a}*{b})</python>"
                   f"<result>\n{a * b}\n</result><answer>{a * b}</answer>")
    return out


def bench_engine(name: str, *, model_path: str, prompts: list[list[int]], tokens: int, repeats: int) -> dict:
    cfg = EngineConfig(name=EngineName(name), max_context=256, max_num_seqs=len(prompts), seed=0)
    t0 = time.perf_counter()
    engine = make_engine(cfg, model_path=model_path)
    init_s = time.perf_counter() - t0
    reqs = [GenerationRequest(p, tokens) for p in prompts]
    try:
        t0 = time.perf_counter()
        engine.generate(reqs, temperature=1.0, top_p=1.0, stop_token_ids=[], seed=0)  # warm-up
        warm_s = time.perf_counter() - t0
        rates, counts = [], []
        for r in range(repeats):
            t0 = time.perf_counter()
            outs = engine.generate(reqs, temperature=1.0, top_p=1.0, stop_token_ids=[], seed=1 + r)
            dt = time.perf_counter() - t0
            n = sum(len(o.token_ids) for o in outs)
            rates.append(n / dt)
            counts.append(n)
    finally:
        engine.shutdown()
    return {"engine": name, "init_s": round(init_s, 2), "warmup_s": round(warm_s, 2),
            "tokens_per_call": counts, "tokens_per_s_median": round(statistics.median(rates), 1),
            "tokens_per_s_all": [round(x, 1) for x in rates]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache-dir", default=None, help="tiny-model cache (default: a temporary directory)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    cache = args.cache_dir or tempfile.mkdtemp(prefix="tepo_bench_")
    model_cfg = ModelConfig(cache_dir=cache)
    model_path = ensure_model(model_cfg, corpus_texts=_corpus())
    tok = load_tokenizer(model_path)
    rng = random.Random(0)
    prompts = [tok.encode(f"Question: what is {rng.randint(100, 999)} * {rng.randint(100, 999)}?\n<think>",
                          add_special_tokens=False) for _ in range(args.prompts)]
    n_params = sum(p.numel() for p in __import__("transformers").AutoModelForCausalLM.from_pretrained(
        model_path).parameters())
    print(f"model: {model_cfg.num_layers} layers x {model_cfg.hidden_size} wide, vocab {len(tok)}, "
          f"{n_params / 1e6:.2f}M params; {args.prompts} prompts x {args.tokens} tokens; "
          f"torch threads {torch.get_num_threads()}")

    hf = bench_engine("hf", model_path=model_path, prompts=prompts, tokens=args.tokens, repeats=args.repeats)
    print(json.dumps(hf))
    ok, why = vllm_available()
    if not ok:
        print(f"vllm skipped: {why}")
        return
    vl = bench_engine("vllm", model_path=model_path, prompts=prompts, tokens=args.tokens, repeats=args.repeats)
    print(json.dumps(vl))
    print(f"ratio vllm/hf tokens/s: {vl['tokens_per_s_median'] / hf['tokens_per_s_median']:.2f}x")


if __name__ == "__main__":
    main()
