"""The embedded tiny policy: a random-init Qwen2 plus a BPE tokenizer trained on the task corpus.

No hub download exists on the machines this runs on (DESIGN.md section 4), so the
demo builds its own model directory, once, into `model.cache_dir`:

* `config.json` / `model.safetensors`: `Qwen2ForCausalLM` from `ModelConfig`
  (head_dim = hidden_size / num_heads must be >= 32 for vLLM's CPU attention;
  the default 256 / 4 = 64 is known to work), untied input/output embeddings so
  weight sync never has to reason about shared tensors.
* `tokenizer.json` & co: byte-level BPE (`tokenizers`) trained on the corpus,
  wrapped as a `PreTrainedTokenizerFast`, with the pre-tokeniser of Qwen2
  (digits one per token) because `AutoTokenizer` rebuilds that pipeline for
  `model_type: qwen2`; load it with `load_tokenizer(path)`. Every agent tag (`<think>`,
  `</python>`, ...) is one added token, so a stop condition is an exact token id;
  `<|endoftext|>` is EOS and `<|pad|>` is padding. Byte-level BPE makes
  `decode(encode(x)) == x` for any NFC-normalised text (all ASCII text).

The model's vocabulary is `len(tokenizer)`, which is `model.vocab_size` unless
the corpus is too small to learn that many merges: every embedding row then
decodes to a real token (an engine never samples an id the tokenizer lacks).

`ensure_model` keys the directory by a hash of the architecture fields and a
fingerprint of the corpus, so a changed corpus or config builds a new model and
an unchanged one is reused. Builds go to a temporary directory that is renamed
into place, so a crash or a concurrent builder never leaves a half-written model.

Weight files exchanged between the learner and the engines are single
safetensors files with Hugging Face parameter names: `save_weights_safetensors`
and `load_state_from_safetensors`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

__all__ = [
    "EOS_TOKEN",
    "PAD_TOKEN",
    "AGENT_TAGS",
    "TINY_BUILD_VERSION",
    "build_tiny_model",
    "ensure_model",
    "load_tokenizer",
    "tiny_model_key",
    "corpus_fingerprint",
    "save_weights_safetensors",
    "load_state_from_safetensors",
]

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
# One added token each (DESIGN.md section 1): stop conditions are exact token ids.
AGENT_TAGS: tuple[str, ...] = (
    "<think>",
    "</think>",
    "<python>",
    "</python>",
    "<search>",
    "</search>",
    "<result>",
    "</result>",
    "<answer>",
    "</answer>",
)
# Bump when the builder changes what it writes: cached models are keyed by it.
TINY_BUILD_VERSION = 1

_ARCH_FIELDS = (
    "hidden_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "intermediate_size",
    "max_position_embeddings",
    "vocab_size",
    "dtype",
    "seed",
)
_MIN_HEAD_DIM = 32  # vLLM CPU attention kernels (DESIGN.md section 4)
_BYTE_ALPHABET = 256
_TAG_RE = re.compile("|".join(re.escape(t) for t in sorted(AGENT_TAGS + (EOS_TOKEN, PAD_TOKEN), key=len, reverse=True)))
_QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# --------------------------------------------------------------------------- keys
def _arch(cfg: Any) -> dict[str, Any]:
    missing = [f for f in _ARCH_FIELDS if not hasattr(cfg, f)]
    if missing:
        raise TypeError(f"model config lacks field(s) {missing}; expected a tepo_ray.config.ModelConfig")
    return {f: getattr(cfg, f) for f in _ARCH_FIELDS}


def corpus_fingerprint(corpus_texts: Iterable[str]) -> str:
    """sha256 over the corpus texts (length-prefixed, so text boundaries count)."""
    h = hashlib.sha256()
    n = 0
    for i, text in enumerate(corpus_texts):
        if not isinstance(text, str):
            raise TypeError(f"corpus_texts[{i}] is {type(text).__name__}; expected str")
        b = text.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
        n += 1
    h.update(n.to_bytes(8, "little"))
    return h.hexdigest()


def tiny_model_key(cfg: Any, *, corpus_sha: str) -> str:
    """Hash of (builder version, architecture fields, corpus fingerprint): the cache directory key."""
    payload = json.dumps({"v": TINY_BUILD_VERSION, "arch": _arch(cfg), "corpus": corpus_sha}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- build
def _check_arch(cfg: Any) -> None:
    head_dim = cfg.hidden_size // cfg.num_heads
    if head_dim < _MIN_HEAD_DIM:
        raise ValueError(
            f"model.hidden_size / model.num_heads = {cfg.hidden_size}/{cfg.num_heads} = {head_dim} is too small; "
            f"vLLM's CPU attention needs head_dim >= {_MIN_HEAD_DIM} (e.g. hidden_size=256, num_heads=4)"
        )
    need = _BYTE_ALPHABET + 2 + len(AGENT_TAGS)
    if cfg.vocab_size < need:
        raise ValueError(
            f"model.vocab_size={cfg.vocab_size} is too small for a byte-level BPE tokenizer; expected >= {need} "
            f"(256 byte symbols + 2 special tokens + {len(AGENT_TAGS)} agent tags)"
        )
    if cfg.dtype not in _DTYPES:
        raise ValueError(f"model.dtype={cfg.dtype!r} is invalid; expected one of {sorted(_DTYPES)}")


def qwen2_bpe_tokenizer():
    """An untrained byte-level BPE `tokenizers.Tokenizer` with Qwen2's normaliser, pre-tokeniser and decoder.

    Exactly the pipeline transformers' Qwen2Tokenizer rebuilds on load (AutoTokenizer forces that class
    for model_type qwen2), so tokenizer.json and AutoTokenizer give the same ids. Digits are split one
    per token by the regex. Used by the tiny model and the chat test model."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def _train_tokenizer(texts: list[str], *, vocab_size: int, model_max_length: int):
    from tokenizers import AddedToken, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = qwen2_bpe_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(AGENT_TAGS),
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Tags are added tokens, matched before BPE; keep them out of the merge statistics.
    pieces = (piece for text in texts for piece in _TAG_RE.split(text) if piece)
    tok.train_from_iterator(pieces, trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in AGENT_TAGS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        clean_up_tokenization_spaces=False,
        model_max_length=model_max_length,
    )


def build_tiny_model(cfg: Any, *, out_dir: str | os.PathLike, corpus_texts: Iterable[str]) -> Path:
    """Create the tiny model directory at `out_dir` unless it already exists; return its path.

    `cfg` is a `ModelConfig` (or anything with its architecture fields). The
    directory is written under a temporary name next to `out_dir` and renamed
    into place, so it either exists complete or not at all.
    """
    out = Path(out_dir)
    if (out / "config.json").is_file():
        return out
    _check_arch(cfg)
    texts = list(corpus_texts)
    if not texts or not any(t.strip() for t in texts):
        raise ValueError("corpus_texts is empty; the tokenizer needs the task corpus to learn its merges")

    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    tokenizer = _train_tokenizer(texts, vocab_size=cfg.vocab_size, model_max_length=cfg.max_position_embeddings)
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    pad_id = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=False,
        use_sliding_window=False,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        bos_token_id=None,
        dtype=cfg.dtype,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = Qwen2ForCausalLM(config)
    model = model.to(_DTYPES[cfg.dtype]).eval()
    model.generation_config = GenerationConfig(eos_token_id=eos_id, pad_token_id=pad_id)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "tepo_tiny.json").write_text(
            json.dumps({"build_version": TINY_BUILD_VERSION, "arch": _arch(cfg), "num_corpus_texts": len(texts)},
                       indent=1, sort_keys=True))
        try:
            os.rename(tmp, out)
        except OSError:
            if not (out / "config.json").is_file():  # lost a race to a complete build: keep theirs
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def ensure_model(model_cfg: Any, *, corpus_texts: Iterable[str]) -> str:
    """Path of the policy model: `model.path` when set, else the cached tiny model (built on first use)."""
    if getattr(model_cfg, "path", None):
        return str(model_cfg.path)
    texts = list(corpus_texts)
    key = tiny_model_key(model_cfg, corpus_sha=corpus_fingerprint(texts))
    out = Path(model_cfg.cache_dir) / "models" / f"tiny-qwen2-{key}"
    return str(build_tiny_model(model_cfg, out_dir=out, corpus_texts=texts))


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer of a model directory (`AutoTokenizer`; the same ids as the engines see)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


# --------------------------------------------------------------------------- weight files
def save_weights_safetensors(model: torch.nn.Module | Mapping[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """Write a model's state dict (HF parameter names) to one safetensors file, atomically.

    Tensors that share storage (tied embeddings) are cloned, since safetensors
    refuses aliased tensors. Written to `path.tmp-<pid>` then `os.replace`d, so a
    reader never sees a partial file.
    """
    from safetensors.torch import save_file

    state = model.state_dict() if isinstance(model, torch.nn.Module) else dict(model)
    seen: set[tuple[int, int]] = set()
    out_state: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) if t.numel() else (id(t), 0)
        if key in seen or not t.is_contiguous():
            t = t.contiguous().clone()
        seen.add(key)
        out_state[name] = t
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        save_file(out_state, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load_state_from_safetensors(model: torch.nn.Module, path: str | os.PathLike, *, strict: bool = True) -> list[str]:
    """Load a safetensors weight file into `model` in place; return the names loaded.

    Missing keys that are tied to a loaded tensor (e.g. `lm_head.weight` when
    `tie_word_embeddings`) are fine; any other missing or unexpected key raises
    `ValueError` naming the keys and the file when `strict`.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weight file {path} does not exist")
    state = load_file(str(path))
    own = model.state_dict()
    unexpected = sorted(set(state) - set(own))
    missing = set(own) - set(state)
    if missing:
        # a tied parameter shares storage with a loaded one, so loading that one fills it
        loaded_ptrs = {own[k].data_ptr() for k in state if k in own}
        missing = {k for k in missing if own[k].data_ptr() not in loaded_ptrs}
    if strict and (unexpected or missing):
        raise ValueError(
            f"weight file {path} does not match the model: missing {sorted(missing)[:8]}, "
            f"unexpected {unexpected[:8]} (expected the learner's full state dict with HF names)"
        )
    for name, t in state.items():
        if name in own and own[name].shape != t.shape:
            raise ValueError(f"weight file {path}: {name} has shape {tuple(t.shape)}, model expects "
                             f"{tuple(own[name].shape)}")
    model.load_state_dict(state, strict=False)
    return sorted(k for k in state if k in own)
