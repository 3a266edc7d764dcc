"""The embedded tiny model: tokenizer round trip and tags, cache keying, atomic build, weight files."""

from __future__ import annotations

import os
import random
import string
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tepo_ray.config import ModelConfig
from tepo_ray.models import (
    AGENT_TAGS,
    EOS_TOKEN,
    PAD_TOKEN,
    build_tiny_model,
    ensure_model,
    load_state_from_safetensors,
    load_tokenizer,
    save_weights_safetensors,
)

SMALL = dict(hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=128,
             max_position_embeddings=128, vocab_size=320)


def corpus(n: int = 120, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(100, 999), rng.randint(100, 999)
        out.append(f"Question: what is {a} * {b}?\n<think>use python</think><python>print({a}*{b})</python>"
                   f"<result>\n{a * b}\n</result><answer>{a * b}</answer>")
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return ensure_model(ModelConfig(cache_dir=str(tmp_path_factory.mktemp("cache")), **SMALL), corpus_texts=corpus())


@pytest.fixture(scope="module")
def tokenizer(model_dir: str):
    return load_tokenizer(model_dir)


# --------------------------------------------------------------------------- tokenizer
ASCII = string.ascii_letters + string.digits + string.punctuation + " \n\t"


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet=ASCII, max_size=120))
def test_tokenizer_round_trips_ascii_text(tokenizer, text: str) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text


def test_round_trip_of_a_transcript_with_tags(tokenizer) -> None:
    text = ("Question: what is 123 * 456?\n\n<think>multiply  it</think><python>x = 123*456\nprint(x)</python>"
            "<result>\n56088\n</result>\t<answer>56088</answer>" + EOS_TOKEN)
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    for tag in AGENT_TAGS + (EOS_TOKEN,):
        assert ids.count(tokenizer.convert_tokens_to_ids(tag)) == text.count(tag)


def test_tags_are_single_distinct_tokens(tokenizer) -> None:
    ids = []
    for tag in AGENT_TAGS + (EOS_TOKEN, PAD_TOKEN):
        enc = tokenizer.encode(tag, add_special_tokens=False)
        assert len(enc) == 1, f"{tag} -> {enc}"
        assert tokenizer.decode(enc) == tag
        ids.append(enc[0])
    assert len(set(ids)) == len(ids)
    assert tokenizer.eos_token_id == ids[-2] and tokenizer.pad_token_id == ids[-1]
    # a tag glued to text still splits out as its one token
    enc = tokenizer.encode("abc</python>def", add_special_tokens=False)
    assert tokenizer.convert_tokens_to_ids("</python>") in enc


def test_digits_are_one_token_each(tokenizer) -> None:
    ids = tokenizer.encode("9081726354", add_special_tokens=False)
    assert len(ids) == 10


def test_auto_tokenizer_matches_tokenizer_json(model_dir: str, tokenizer) -> None:
    """AutoTokenizer rebuilds Qwen2's pre-tokeniser for model_type qwen2; the saved tokenizer.json must agree."""
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
    rng = random.Random(1)
    pieces = list(ASCII) + list(AGENT_TAGS) + ["what", "'s", " the", "  ", "\n\n", "123"]
    for _ in range(300):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 40)))
        assert tokenizer.encode(text, add_special_tokens=False) == raw.encode(text).ids, repr(text)


# --------------------------------------------------------------------------- model dir
def test_model_matches_config_and_tokenizer(model_dir: str, tokenizer) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    c = model.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (64, 1, 2, 1)
    assert c.hidden_size // c.num_attention_heads >= 32
    assert c.tie_word_embeddings is False
    assert c.vocab_size == len(tokenizer) <= SMALL["vocab_size"]
    assert c.eos_token_id == tokenizer.eos_token_id
    ids = torch.tensor([tokenizer.encode("Question: what is 1 * 2?", add_special_tokens=False)])
    assert model(ids).logits.shape == (1, ids.shape[1], c.vocab_size)


def test_ensure_model_is_cached_and_keyed(tmp_path: Path) -> None:
    cfg = ModelConfig(cache_dir=str(tmp_path), **SMALL)
    texts = corpus(40)
    p1 = ensure_model(cfg, corpus_texts=iter(texts))  # an iterator is fine
    stamp = os.stat(Path(p1) / "model.safetensors").st_mtime_ns
    assert ensure_model(cfg, corpus_texts=texts) == p1
    assert os.stat(Path(p1) / "model.safetensors").st_mtime_ns == stamp  # reused, not rebuilt
    p2 = ensure_model(cfg, corpus_texts=texts + ["another text"])
    p3 = ensure_model(ModelConfig(cache_dir=str(tmp_path), **{**SMALL, "seed": 1}), corpus_texts=texts)
    assert len({p1, p2, p3}) == 3
    # nothing half-built is left next to the finished models
    assert sorted(x.name for x in (tmp_path / "models").iterdir()) == sorted(Path(p).name for p in (p1, p2, p3))
    assert ensure_model(ModelConfig(path="/models/my-qwen"), corpus_texts=[]) == "/models/my-qwen"


def test_same_seed_builds_same_weights(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    cfg = ModelConfig(**SMALL)
    a = build_tiny_model(cfg, out_dir=tmp_path / "a", corpus_texts=corpus(40))
    b = build_tiny_model(cfg, out_dir=tmp_path / "b", corpus_texts=corpus(40))
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()


def test_bad_architecture_and_corpus_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"model.hidden_size / model.num_heads .* head_dim >= 32"):
        build_tiny_model(ModelConfig(**{**SMALL, "num_heads": 4, "num_kv_heads": 1}), out_dir=tmp_path / "x",
                         corpus_texts=corpus(5))
    with pytest.raises(ValueError, match=r"model.vocab_size=200 .* expected >= 268"):
        build_tiny_model(ModelConfig(**{**SMALL, "vocab_size": 200}), out_dir=tmp_path / "x", corpus_texts=corpus(5))
    with pytest.raises(ValueError, match="corpus_texts is empty"):
        build_tiny_model(ModelConfig(**SMALL), out_dir=tmp_path / "x", corpus_texts=[])
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------- weight files
def test_safetensors_round_trip_into_another_model(model_dir: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    src = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        for p in src.parameters():
            p.add_(torch.randn_like(p))
    path = save_weights_safetensors(src, tmp_path / "w.safetensors")
    assert [x.name for x in tmp_path.iterdir()] == ["w.safetensors"]  # no temp file left behind
    dst = AutoModelForCausalLM.from_pretrained(model_dir)
    assert not torch.equal(dst.lm_head.weight, src.lm_head.weight)
    names = load_state_from_safetensors(dst, path)
    assert set(names) == set(src.state_dict())
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k


def test_tied_embeddings_are_cloned_on_save_and_stay_tied_on_load(tmp_path: Path) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=50, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    src = Qwen2ForCausalLM(cfg)
    assert src.lm_head.weight.data_ptr() == src.model.embed_tokens.weight.data_ptr()
    path = save_weights_safetensors(src, tmp_path / "tied.safetensors")  # safetensors refuses aliased tensors
    dst = Qwen2ForCausalLM(cfg)
    load_state_from_safetensors(dst, path)
    assert torch.equal(dst.model.embed_tokens.weight, src.model.embed_tokens.weight)
    assert dst.lm_head.weight.data_ptr() == dst.model.embed_tokens.weight.data_ptr()


def test_mismatched_weight_file_names_the_keys(model_dir: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    state = {k: v.clone() for k, v in model.state_dict().items() if k != "model.norm.weight"}
    state["extra.weight"] = torch.zeros(2)
    path = save_weights_safetensors(state, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match=r"missing \['model.norm.weight'\], unexpected \['extra.weight'\]"):
        load_state_from_safetensors(model, path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_state_from_safetensors(model, tmp_path / "nope.safetensors")
