"""Fixtures for agent tests: the trained tiny chat model with multi-token tags (built once per session)."""

from __future__ import annotations

import pytest
import torch

from chat_fixtures import ChatModel, build_trained_chat_model


@pytest.fixture(scope="session")
def chat_model(tmp_path_factory: pytest.TempPathFactory) -> ChatModel:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return build_trained_chat_model(tmp_path_factory.mktemp("chat_model"))
    finally:
        torch.set_num_threads(threads)
