"""Engine registry and the stop/finish rule shared by every engine (no model needed except for make_engine)."""

from __future__ import annotations

import pytest

from tepo_ray.config import EngineConfig, EngineName
from tepo_ray.engines import (
    Engine,
    HFEngine,
    VLLMEngine,
    finish_output,
    make_engine,
    register_engine,
    registered_engines,
)


def test_builtin_engines_are_registered_under_the_config_enum_names() -> None:
    assert set(registered_engines()) >= {e.value for e in EngineName}
    assert register_engine("hf")(HFEngine) is HFEngine  # re-registering the same class is a no-op
    assert HFEngine.name == "hf" and VLLMEngine.name == "vllm"


def test_unknown_engine_name_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"engine.name='sglang' is unknown; expected one of \['hf', 'vllm'"):
        make_engine(EngineConfig(name="sglang"), model_path="unused")  # type: ignore[arg-type]


def test_register_rejects_conflicts_and_non_engines() -> None:
    with pytest.raises(ValueError, match="already registered to HFEngine"):
        register_engine("hf")(VLLMEngine)
    with pytest.raises(TypeError, match="expected an Engine subclass"):
        register_engine("str")(str)  # type: ignore[arg-type]
    assert "str" not in registered_engines()
    assert issubclass(HFEngine, Engine)


def test_importing_engines_does_not_import_vllm() -> None:
    import subprocess
    import sys

    code = "import sys, tepo_ray.engines; assert 'vllm' not in sys.modules, 'vllm imported eagerly'"
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------- finish rule, worked examples
EOS, CLOSE_PY, CLOSE_ANS = 0, 7, 9


def test_first_stop_token_ends_the_output_and_is_kept() -> None:
    out = finish_output([4, 5, CLOSE_PY, 6, CLOSE_ANS], stop_ids={CLOSE_PY, CLOSE_ANS}, eos_ids={EOS},
                        logprobs=[-1.0, -2.0, -3.0, -4.0, -5.0], request_id="a")
    assert (out.token_ids, out.finish_reason, out.stop_token, out.logprobs, out.request_id) == (
        [4, 5, CLOSE_PY], "stop", CLOSE_PY, [-1.0, -2.0, -3.0], "a")


def test_eos_is_named_eos_even_when_also_a_stop_token() -> None:
    out = finish_output([4, EOS, 5], stop_ids={EOS, CLOSE_PY}, eos_ids={EOS}, logprobs=None)
    assert (out.token_ids, out.finish_reason, out.stop_token, out.logprobs) == ([4, EOS], "eos", EOS, None)


def test_no_stop_token_means_length() -> None:
    out = finish_output([4, 5, 6], stop_ids={CLOSE_PY}, eos_ids={EOS}, logprobs=[-0.5, -0.5, -0.5])
    assert (out.token_ids, out.finish_reason, out.stop_token) == ([4, 5, 6], "length", None)
    # a stop token sampled as the very last budgeted token is still a stop
    out = finish_output([4, CLOSE_PY], stop_ids={CLOSE_PY}, eos_ids={EOS}, logprobs=None)
    assert out.finish_reason == "stop"
