"""Engine test fixtures: one tiny model + trained learner per session, one engine per kind per module."""

from __future__ import annotations

import pytest
import torch

from engine_fixtures import (
    ANSWER_PROMPT,
    ANSWER_TARGET,
    ENGINE_TEST_CFG,
    ENGINE_TEST_MODEL,
    PYTHON_PROMPT,
    PYTHON_TARGET,
    LearnerState,
    agent_corpus,
    one_torch_thread,
)
from tepo_ray.config import EngineConfig, EngineName, ModelConfig
from tepo_ray.engines import Engine, make_engine, vllm_available
from tepo_ray.models import ensure_model, load_tokenizer, save_weights_safetensors


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread_per_module():
    with one_torch_thread():
        yield


@pytest.fixture(scope="session")
def learner_state(tmp_path_factory: pytest.TempPathFactory) -> LearnerState:
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("engine_model")
    model_dir = ensure_model(ModelConfig(cache_dir=str(root), **ENGINE_TEST_MODEL), corpus_texts=agent_corpus())
    tokenizer = load_tokenizer(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    base_path = save_weights_safetensors(base, root / "weights_v0.safetensors")

    learner = AutoModelForCausalLM.from_pretrained(model_dir)
    enc = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    batch = [(enc(PYTHON_PROMPT), enc(PYTHON_TARGET)), (enc(ANSWER_PROMPT), enc(ANSWER_TARGET))]
    opt = torch.optim.Adam(learner.parameters(), lr=3e-3)
    torch.manual_seed(0)
    with one_torch_thread():
        for _ in range(80):
            loss = 0.0
            for p, c in batch:
                ids = torch.tensor([p + c])
                labels = torch.tensor([[-100] * len(p) + c])
                loss = loss + learner(input_ids=ids, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    learner.eval()
    trained_path = save_weights_safetensors(learner, root / "weights_v1.safetensors")
    return LearnerState(model_dir, base_path, trained_path, learner, base, tokenizer)


ENGINE_PARAMS = [
    pytest.param("hf", id="hf"),
    pytest.param("vllm", id="vllm", marks=pytest.mark.vllm),
]


@pytest.fixture(scope="module", params=ENGINE_PARAMS)
def engine(request: pytest.FixtureRequest, learner_state: LearnerState) -> Engine:
    """One engine per kind per module, on the checkpoint weights; tests reload what they need."""
    name = request.param
    if name == "vllm":
        ok, why = vllm_available()
        if not ok:
            pytest.skip(why)
    eng = make_engine(EngineConfig(name=EngineName(name), **ENGINE_TEST_CFG), model_path=learner_state.model_dir)
    yield eng
    eng.shutdown()
