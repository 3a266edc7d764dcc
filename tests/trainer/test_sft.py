"""SFT warm-start: the loss falls, masked tokens never matter, the output is a complete model dir."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from tepo_ray.config import ModelConfig
from tepo_ray.trainer.batching import make_token_batch
from tepo_ray.trainer.checkpoint import load_policy
from tepo_ray.trainer.sft import LRSchedule, sft_loss, sft_train

from trainer_factories import VOCAB, make_trajectory


def _examples(n: int, *, seed: int = 0, vocab: int = VOCAB) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = [rng.randrange(1, vocab) for _ in range(4)]
        call = [rng.randrange(1, vocab) for _ in range(6)]
        obs = [rng.randrange(1, vocab) for _ in range(5)]
        answer = [rng.randrange(1, vocab) for _ in range(6)]
        out.append({
            "token_ids": prompt + call + obs + answer,
            "loss_mask": [0] * 4 + [1] * 6 + [0] * 5 + [1] * 6,
        })
    return out


def test_loss_decreases_on_repeated_data_and_saves_model(tiny_model: str, tmp_path: Path) -> None:
    data = _examples(4)
    out = tmp_path / "sft"
    metrics = sft_train(tiny_model, examples=data * 4, steps=30, lr=3e-3, batch_size=4, out_dir=out,
                        seed=0, progress=False, warmup_steps=2)
    assert metrics["loss_last"] < 0.5 * metrics["loss_first"]
    assert len(metrics["loss_history"]) == 30
    assert metrics["tokens"] == 30 * 4 * 12
    saved = json.loads((out / "sft_metrics.json").read_text())
    assert saved["loss_last"] == metrics["loss_last"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary dir left

    # The saved model reproduces the low loss, the initial one does not.
    batch = make_token_batch([d["token_ids"] for d in data], [d["loss_mask"] for d in data])
    with torch.no_grad():
        trained = float(sft_loss(load_policy(out), batch))
        initial = float(sft_loss(load_policy(tiny_model), batch))
    assert trained < 0.5 * initial


def test_masked_tokens_do_not_influence_loss_or_gradient(tiny_model: str) -> None:
    model = load_policy(tiny_model)
    traj = make_trajectory(uid="a", prompt_len=4, gen_lens=(6, 5), obs_lens=(4,), seed=1)
    # Append a trailing observation (masked) whose tokens we can change freely.
    ids = traj.token_ids + [7, 8, 9, 10]
    mask = traj.loss_mask + [0, 0, 0, 0]

    def loss_and_grad(token_ids, loss_mask):
        model.zero_grad(set_to_none=True)
        loss = sft_loss(model, make_token_batch([token_ids], [loss_mask]))
        loss.backward()
        return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    base_loss, base_grad = loss_and_grad(ids, mask)
    changed = ids[:-4] + [99, 98, 97, 96]
    loss2, grad2 = loss_and_grad(changed, mask)
    assert loss2 == base_loss
    assert all(torch.equal(base_grad[n], grad2[n]) for n in base_grad)

    # Padding next to a shorter sequence does not change that sequence's loss either.
    short = make_trajectory(uid="b", prompt_len=3, gen_lens=(4,), obs_lens=(), seed=2)
    with torch.no_grad():
        alone = float(sft_loss(model, make_token_batch([short.token_ids], [short.loss_mask])))
        n_short, n_long = sum(short.loss_mask), sum(mask)
        both = float(sft_loss(model, make_token_batch([short.token_ids, ids], [short.loss_mask, mask])))
        long_only = float(sft_loss(model, make_token_batch([ids], [mask])))
    assert both == pytest.approx((alone * n_short + long_only * n_long) / (n_short + n_long), abs=1e-6)

    # Sanity: the test can fail — training on an observation token does change the loss.
    unmasked = list(mask)
    unmasked[-1] = 1
    assert loss_and_grad(changed, unmasked)[0] != loss2


def test_tokenizer_is_copied_with_the_model(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from tepo_ray.models.tiny import build_tiny_model

    cfg = ModelConfig(hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64,
                      vocab_size=300, max_position_embeddings=128)
    corpus = ["what is 12 * 34? <python>print(12*34)</python><result>408</result><answer>408</answer>"] * 20
    src = build_tiny_model(cfg, out_dir=tmp_path / "tiny", corpus_texts=corpus)
    tok = AutoTokenizer.from_pretrained(src)
    ids = tok("what is 12 * 34?")["input_ids"] + tok("<python>print(12*34)</python>")["input_ids"]
    n_prompt = len(tok("what is 12 * 34?")["input_ids"])
    example = (ids, [0] * n_prompt + [1] * (len(ids) - n_prompt))
    out = tmp_path / "warm"
    sft_train(src, examples=[example], steps=2, lr=1e-3, batch_size=2, out_dir=out, progress=True)
    sft_train(src, examples=[example], steps=1, lr=1e-3, batch_size=1, out_dir=out, progress=False)  # overwrite
    assert AutoTokenizer.from_pretrained(out)("<answer>")["input_ids"] == tok("<answer>")["input_ids"]
    assert load_policy(out).config.vocab_size == len(tok)


def test_bad_examples_name_the_index(tiny_model: str, tmp_path: Path) -> None:
    good = _examples(1)[0]
    with pytest.raises(ValueError, match=r"examples\[1\]: token_ids has 3 entries, loss_mask 2"):
        sft_train(tiny_model, examples=[good, {"token_ids": [1, 2, 3], "loss_mask": [0, 1]}], steps=1, lr=1e-3,
                  batch_size=1, out_dir=tmp_path / "o", progress=False)
    with pytest.raises(ValueError, match=r"examples\[0\].*all 0"):
        sft_train(tiny_model, examples=[([1, 2], [0, 0])], steps=1, lr=1e-3, batch_size=1,
                  out_dir=tmp_path / "o", progress=False)
    with pytest.raises(ValueError, match="schedule"):
        LRSchedule("exponential", total_steps=3)


def test_lr_schedules() -> None:
    cos = LRSchedule("cosine", total_steps=10, warmup_steps=2)
    assert [cos(0), cos(1)] == [0.5, 1.0]
    assert cos(2) == pytest.approx(1.0)
    assert cos(7) == pytest.approx(0.5 * (1 + math.cos(5 / 8 * math.pi)))
    assert cos(10) == pytest.approx(0.0, abs=1e-12)
    lin = LRSchedule("linear", total_steps=4, min_ratio=0.2)
    assert [lin(s) for s in range(5)] == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2])


# --------------------------------------------------------------------------- chat-message demonstrations
CHAT_SYSTEM = "Use tools."


def _chat_line(a: int, b: int) -> dict:
    return {"messages": [
        {"role": "system", "content": CHAT_SYSTEM},
        {"role": "user", "content": f"What is {a} * {b}?"},
        {"role": "assistant", "content": f"<think>tool</think><python>print({a}*{b})</python>"},
        {"role": "tool", "content": f"{a * b}\n"},
        {"role": "assistant", "content": f"<think>done</think><answer>{a * b}</answer>"},
    ]}


@pytest.fixture(scope="module")
def chat_setup(tmp_path_factory: pytest.TempPathFactory):
    from tepo_ray.models.chat_testing import build_chat_test_model

    root = tmp_path_factory.mktemp("chat_sft")
    rng = random.Random(0)
    lines = [_chat_line(rng.randint(10, 99), rng.randint(10, 99)) for _ in range(8)]
    corpus = [json.dumps(x) for x in lines] + ["<|im_start|>assistant\n<think>tool</think><python>print(1)</python>"]
    model_dir = build_chat_test_model(root / "model", corpus_texts=corpus, max_position_embeddings=256)
    sft_file = root / "demos.jsonl"
    sft_file.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return root, str(model_dir), sft_file


def _chat_overrides(root: Path, model_dir: str, sft_file: Path) -> list[str]:
    return [f"model.path={model_dir}", f"model.cache_dir={root / 'cache'}", "data.task=arithmetic",
            "data.num_train=8", "data.num_eval=0", f"data.sft_path={sft_file}", "trainer.sft_steps=12",
            "trainer.sft_batch_size=4", "trainer.sft_lr=3e-3", "tools.search.workers=0", "logging.progress=false"]


def test_chat_demonstration_masks_observations_and_prompt(chat_setup) -> None:
    from transformers import AutoTokenizer

    from tepo_ray.agent.prompts import PromptBuilder, encode_chat_example

    _, model_dir, _ = chat_setup
    tok = AutoTokenizer.from_pretrained(model_dir)
    builder = PromptBuilder(tok, system_prompt="unused default", use_chat_template="auto")
    ids, mask = encode_chat_example(builder, _chat_line(12, 34)["messages"])
    text_of = lambda keep: "".join(tok.decode([i]) for i, m in zip(ids, mask) if m == keep)  # noqa: E731
    assert text_of(1) == "<think>tool</think><python>print(12*34)</python><think>done</think><answer>408</answer>"
    assert text_of(0) == (f"<|im_start|>system\n{CHAT_SYSTEM}<|im_end|>\n<|im_start|>user\nWhat is 12 * 34?"
                          f"<|im_end|>\n<|im_start|>assistant\n<result>408\n</result>")
    assert mask.index(1) == len(builder.prompt_ids("What is 12 * 34?", system=CHAT_SYSTEM))


def test_tepo_ray_sft_trains_a_model_path_on_chat_jsonl_and_train_starts_from_it(chat_setup) -> None:
    from typer.testing import CliRunner

    from tepo_ray.agent.prompts import PromptBuilder
    from tepo_ray.cli import app
    from tepo_ray.config import load_config
    from tepo_ray.prepare import prepare_data
    from tepo_ray.trainer.sft import load_chat_demonstrations

    root, model_dir, sft_file = chat_setup
    overrides = _chat_overrides(root, model_dir, sft_file)
    res = CliRunner().invoke(app, ["sft", "experiments/configs/tiny.yaml", *overrides])
    assert res.exit_code == 0, res.output
    out = res.output.split("SFT checkpoint:")[1].split()[0]
    assert Path(out, "config.json").is_file()
    assert "chat_template" in json.loads(Path(out, "tokenizer_config.json").read_text())
    # the loss on the demonstrations fell from the base model's
    from transformers import AutoTokenizer

    builder = PromptBuilder(AutoTokenizer.from_pretrained(out), system_prompt="x")
    ex = load_chat_demonstrations(sft_file, builder=builder)
    batch = make_token_batch([e[0] for e in ex], [e[1] for e in ex], pad_id=0)
    with torch.no_grad():
        assert float(sft_loss(load_policy(out), batch)) < 0.8 * float(sft_loss(load_policy(model_dir), batch))
    # `train` prepares its data the same way and starts from that checkpoint
    cfg = load_config(["experiments/configs/tiny.yaml"], overrides)
    assert prepare_data(cfg, progress=False).model_path == out


@pytest.mark.parametrize("line, expected", [
    ('{"messages": [', "invalid JSON"),
    ('{"msgs": []}', "field 'messages'"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "robot", "content": "x"}]}', "messages[1].role"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 3}]}', "messages[1].content"),
    ('{"messages": [{"role": "assistant", "content": "a"}]}', "messages[0].role must be 'user'"),
])
def test_bad_chat_line_names_file_line_and_field(chat_setup, tmp_path: Path, line: str, expected: str) -> None:
    from transformers import AutoTokenizer

    from tepo_ray.agent.prompts import PromptBuilder
    from tepo_ray.trainer.sft import SFTDataError, load_chat_demonstrations

    _, model_dir, _ = chat_setup
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(_chat_line(1, 2)) + "\n" + line + "\n")
    builder = PromptBuilder(AutoTokenizer.from_pretrained(model_dir), system_prompt="x")
    with pytest.raises(SFTDataError) as info:
        load_chat_demonstrations(bad, builder=builder)
    assert f"{bad}:2" in str(info.value) and expected in str(info.value)


def test_sft_cli_needs_sft_path_for_a_model_path(chat_setup) -> None:
    from typer.testing import CliRunner

    from tepo_ray.cli import app

    root, model_dir, _ = chat_setup
    res = CliRunner().invoke(app, ["sft", "experiments/configs/tiny.yaml", f"model.path={model_dir}"])
    assert res.exit_code == 2 and "data.sft_path" in res.output


def test_load_policy_takes_a_hub_id_and_says_why_it_failed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from tepo_ray.trainer.checkpoint import is_hub_id

    import huggingface_hub.constants

    # no hub here: the id is tried offline and the error says so
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert is_hub_id("Qwen/Qwen2.5-7B-Instruct") and not is_hub_id(str(tmp_path)) and not is_hub_id("./a/b")
    with pytest.raises(FileNotFoundError, match="could not be loaded as a hub id"):
        load_policy("tepo-ray-test/no-such-model")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_policy(tmp_path / "missing")
