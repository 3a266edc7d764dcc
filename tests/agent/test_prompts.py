"""Prompt building: default system prompt found from anywhere, overrides, and clear errors."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from chat_fixtures import QUESTION, ChatModel
from tepo_ray.agent.prompts import DEFAULT_SYSTEM_PROMPT, PromptBuilder, load_system_prompt, resolve_prompt_path
from tepo_ray.config import ConfigError, PromptConfig, load_config


def test_default_system_prompt_is_found_from_any_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = resolve_prompt_path(None)
    assert path.as_posix().endswith(DEFAULT_SYSTEM_PROMPT)
    text = load_system_prompt(None)
    for tag in ("<think>", "<python>", "<search>", "<result>", "<answer>"):
        assert tag in text


def test_relative_prompt_path_prefers_cwd_and_missing_file_names_the_key(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.txt").write_text("my tools")
    assert load_system_prompt("mine.txt") == "my tools"
    with pytest.raises(FileNotFoundError, match="prompt.system_prompt_path='nope.txt'"):
        load_system_prompt("nope.txt")


def test_chat_mode_follows_the_tokenizer_and_the_config(chat_model: ChatModel) -> None:
    tok = chat_model.tokenizer
    plain_tok = copy.deepcopy(tok)
    plain_tok.chat_template = None
    assert PromptBuilder.from_config(tok, None).mode == "chat"
    assert PromptBuilder.from_config(plain_tok, None).mode == "plain"
    assert plain_tok.decode(PromptBuilder.from_config(plain_tok, None).prompt_ids(QUESTION)) == f"Question: {QUESTION}\n"
    with pytest.raises(ValueError, match="prompt.use_chat_template=true"):
        PromptBuilder.from_config(plain_tok, PromptConfig(use_chat_template="true"))


def test_prompt_config_keys_are_checked() -> None:
    cfg = load_config([], ["prompt.use_chat_template=true", "prompt.system_prompt_path=x.txt"])
    assert (cfg.prompt.use_chat_template, cfg.prompt.system_prompt_path) == ("true", "x.txt")
    with pytest.raises(ConfigError, match="prompt.use_chat_template"):
        load_config([], ["prompt.use_chat_template=maybe"])
