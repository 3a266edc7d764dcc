"""Test-only builder: a tiny "instruct" model whose tokenizer looks like a stock hub tokenizer.

Stock tokenizers (Qwen2.5, Llama, ...) do not know the agent tags: `</python>`
is several tokens, e.g. `</` + `python` + `>`, and a tag may end inside a token
(`>\\n`, `><`). Tests of the multi-token tag path need such a tokenizer without a
hub download, so this module builds one from config:

* byte-level BPE trained with `tokenizers` on agent transcripts, with the Qwen2
  pre-tokeniser (letters and punctuation are separate pre-tokens, so `<python>`
  can never merge into one token; punctuation runs such as `><` or `>\\n` can);
* ChatML special tokens `<|im_start|>`, `<|im_end|>` (EOS) and `<|endoftext|>`
  (padding), and a Qwen-style ChatML Jinja `chat_template`;
* saved in the standard Hugging Face layout by `save_pretrained` with the
  template inside `tokenizer_config.json` (`save_jinja_files=False`), and
  loaded by `AutoTokenizer`;
* a random-init `Qwen2ForCausalLM` sized by the caller (head_dim >= 32 for vLLM on CPU).

`build_chat_test_model` refuses to write a tokenizer in which any agent tag is a
single token: the point of the builder is that they are not.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

import torch

__all__ = ["CHATML_TEMPLATE", "IM_START", "IM_END", "CHAT_PAD", "build_chat_test_model"]

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
CHAT_PAD = "<|endoftext|>"
# Qwen2.5-style ChatML: every message is <|im_start|>{role}\n{content}<|im_end|>\n.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _train_chat_tokenizer(texts: list[str], *, vocab_size: int, model_max_length: int):
    from tokenizers import pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tepo_ray.models.tiny import qwen2_bpe_tokenizer

    tok = qwen2_bpe_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[CHAT_PAD, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=CHAT_PAD,
        clean_up_tokenization_spaces=False,
        model_max_length=model_max_length,
        chat_template=CHATML_TEMPLATE,
    )


def build_chat_test_model(
    out_dir: str | os.PathLike,
    *,
    corpus_texts: Iterable[str],
    vocab_size: int = 600,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 2,
    num_kv_heads: int = 1,
    intermediate_size: int = 256,
    max_position_embeddings: int = 1024,
    seed: int = 0,
) -> Path:
    """Write a tiny Qwen2 + stock-layout chat tokenizer into `out_dir` (reused when complete); return it."""
    from transformers import AutoTokenizer, GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    from tepo_ray.agent import SPECIAL_TOKENS

    out = Path(out_dir)
    if (out / "config.json").is_file():
        return out
    texts = [t for t in corpus_texts if t.strip()]
    if not texts:
        raise ValueError("corpus_texts is empty; the tokenizer needs text to learn its merges")
    tokenizer = _train_chat_tokenizer(texts, vocab_size=vocab_size, model_max_length=max_position_embeddings)
    single = [t for t in SPECIAL_TOKENS if len(tokenizer.encode(t, add_special_tokens=False)) == 1]
    if single:
        raise ValueError(f"agent tags {single} became single tokens; this builder must split every tag")
    eos_id = tokenizer.convert_tokens_to_ids(IM_END)
    pad_id = tokenizer.convert_tokens_to_ids(CHAT_PAD)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings, tie_word_embeddings=False, use_sliding_window=False,
        eos_token_id=eos_id, pad_token_id=pad_id, bos_token_id=None, dtype="float32",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config).eval()
    model.generation_config = GenerationConfig(eos_token_id=eos_id, pad_token_id=pad_id)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp, save_jinja_files=False)  # chat_template inside tokenizer_config.json
        reloaded = AutoTokenizer.from_pretrained(str(tmp))
        probe = texts[0]
        if reloaded.encode(probe, add_special_tokens=False) != tokenizer.encode(probe, add_special_tokens=False):
            raise RuntimeError("AutoTokenizer does not reproduce the trained tokenizer's ids")
        os.rename(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
