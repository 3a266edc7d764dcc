"""Policy models: the embedded tiny Qwen2 + BPE tokenizer, and safetensors weight files."""

from tepo_ray.models.tiny import (
    AGENT_TAGS,
    EOS_TOKEN,
    PAD_TOKEN,
    build_tiny_model,
    corpus_fingerprint,
    ensure_model,
    load_state_from_safetensors,
    load_tokenizer,
    save_weights_safetensors,
    tiny_model_key,
)

__all__ = [
    "AGENT_TAGS",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "build_tiny_model",
    "corpus_fingerprint",
    "ensure_model",
    "load_state_from_safetensors",
    "load_tokenizer",
    "save_weights_safetensors",
    "tiny_model_key",
]
