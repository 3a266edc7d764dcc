"""A tiny instruct model with a stock-layout chat tokenizer (agent tags split into several tokens), trained
with Adam to play one two-turn agent episode, so greedy generation must hit multi-token stop strings.

The episode is laid out exactly as the agent loop lays out a rollout: the chat-template prompt, turn 1
ending with `</python>` whose last token is `>\\n` (the stop string ends inside it), the observation ids
tokenised on their own, turn 2 ending with `</answer>` + EOS.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

SYSTEM = "Use tools. Answer in tags."
QUESTION = "What is 412 * 37?"
TURN1 = "<think>I need the tool</think><python>print(412*37)</python>\n"
OBSERVATION = "15244\n"
TURN2 = "<think>done</think><answer>15244</answer>"


def chat_corpus(n: int = 150, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(10, 999), rng.randint(10, 99)
        out.append(f"<|im_start|>user\nWhat is {a} * {b}?<|im_end|>\n<|im_start|>assistant\n"
                   f"<think>I need the tool</think><python>print({a}*{b})</python>\n<result>{a * b}\n</result>"
                   f"<think>done</think><answer>{a * b}</answer><|im_end|>")
        out.append(f"Question: who wrote doc {a}?\n<think>search it</think><search>doc {a} author</search>"
                   f"<result>Doc {a} was written by the generator.</result><answer>the generator</answer>")
    return out


@dataclass
class ChatModel:
    model_dir: str
    system_prompt_file: str
    tokenizer: object
    prompt_ids: list[int]
    turn1_ids: list[int]
    obs_ids: list[int]
    turn2_ids: list[int]  # ends with the EOS id


def build_trained_chat_model(root: Path, *, steps: int = 60) -> ChatModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tepo_ray.agent import format_observation
    from tepo_ray.agent.prompts import PromptBuilder
    from tepo_ray.models.chat_testing import build_chat_test_model

    base = build_chat_test_model(root / "base", corpus_texts=chat_corpus())
    tok = AutoTokenizer.from_pretrained(str(base))
    sys_file = root / "system.txt"
    sys_file.write_text(SYSTEM)
    builder = PromptBuilder(tok, system_prompt=SYSTEM, use_chat_template="true")
    enc = builder.encode
    prompt, t1, obs = builder.prompt_ids(QUESTION), enc(TURN1), enc(format_observation(OBSERVATION))
    t2 = enc(TURN2) + [tok.eos_token_id]
    seq = prompt + t1 + obs + t2
    labels = [-100] * len(prompt) + t1 + [-100] * len(obs) + t2
    model = AutoModelForCausalLM.from_pretrained(str(base))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _ in range(steps):
        loss = model(input_ids=torch.tensor([seq]), labels=torch.tensor([labels])).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = root / "trained"
    model.eval().save_pretrained(out)
    tok.save_pretrained(out, save_jinja_files=False)
    return ChatModel(str(out), str(sys_file), tok, prompt, t1, obs, t2)
