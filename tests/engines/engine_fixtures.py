"""Helpers for engine tests (the fixtures are in conftest.py): a tiny Qwen2 and a learner that trains it.

The learner is a separate transformers model that memorises two agent
continuations with Adam (a real optimizer, not noise), so after a weight sync
greedy generation must reproduce them: one ends with the `</python>` stop tag,
the other with EOS. Everything here is built once per session.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from pathlib import Path

import torch

# head_dim = 128 / 2 = 64 (vLLM CPU needs >= 32)
ENGINE_TEST_MODEL = dict(hidden_size=128, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=256,
                         max_position_embeddings=512, vocab_size=400, seed=0)
ENGINE_TEST_CFG = dict(max_context=160, max_num_seqs=16, seed=0)

PYTHON_PROMPT = "Question: what is 412 * 37?\n"
PYTHON_TARGET = "<think>I need the tool</think><python>print(412*37)</python>"
ANSWER_PROMPT = "Question: who wrote the corpus?\n"
ANSWER_TARGET = "<think>easy</think><answer>the generator</answer><|endoftext|>"


def agent_corpus(n: int = 200, seed: int = 0) -> list[str]:
    """Synthetic tool-use transcripts in the agent format (DESIGN.md section 1)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(10, 999), rng.randint(10, 99)
        out.append(
            f"Question: what is {a} * {b}?\n<think>I need the tool</think><python>print({a}*{b})</python>"
            f"<result>\n{a * b}\n</result><think>done</think><answer>{a * b}</answer>"
        )
        out.append(f"Question: who wrote doc {a}?\n<think>search it</think><search>doc {a} author</search>"
                   f"<result>Doc {a} was written by the generator.</result><answer>the generator</answer>")
    return out


@dataclass
class LearnerState:
    model_dir: str
    base_weights: Path  # the checkpoint as a safetensors file (version 0)
    trained_weights: Path  # after Adam on the two targets (version 1)
    learner: torch.nn.Module  # holds the trained weights
    base_model: torch.nn.Module  # holds the checkpoint weights
    tokenizer: object

    def ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def tok(self, token: str) -> int:
        return int(self.tokenizer.convert_tokens_to_ids(token))


@contextlib.contextmanager
def one_torch_thread():
    """One intra-op thread, as in a 1-CPU generation actor: with 2 OpenMP threads on a 2-core box that
    other test processes also load, this tiny model runs ~40x slower (threads spin-wait for a core)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def teacher_forced_logprobs(model: torch.nn.Module, seq: list[int]) -> torch.Tensor:
    """log π(seq[t] | seq[:t]) for t >= 1 from a plain transformers forward. -> [len(seq) - 1]"""
    with torch.no_grad():
        logits = model(torch.tensor([seq])).logits[0, :-1].float()  # [T-1, V]
        return torch.log_softmax(logits, -1).gather(-1, torch.tensor(seq[1:])[:, None])[:, 0]
