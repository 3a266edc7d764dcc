"""Generation engines behind one interface (`Engine`), built by name from `EngineConfig`.

    from tepo_ray.engines import make_engine, GenerationRequest
    engine = make_engine(cfg.engine, model_path=path)   # "hf" or "vllm"
    outs = engine.generate([GenerationRequest(prompt_ids, max_tokens=64)],
                           temperature=1.0, top_p=1.0, stop_token_ids=[close_python_id])
    engine.update_weights("weights_v1.safetensors", version=1)
    engine.shutdown()

Importing this package registers the built-in engines; `vllm` itself is only
imported when a vllm engine is built.
"""

from tepo_ray.engines.base import (
    Engine,
    FinishReason,
    GenerationOutput,
    GenerationRequest,
    finish_output,
    make_engine,
    register_engine,
    registered_engines,
)
from tepo_ray.engines.hf import HFEngine
from tepo_ray.engines.vllm_engine import VLLMEngine, vllm_available

__all__ = [
    "Engine",
    "FinishReason",
    "GenerationOutput",
    "GenerationRequest",
    "HFEngine",
    "VLLMEngine",
    "finish_output",
    "make_engine",
    "register_engine",
    "registered_engines",
    "vllm_available",
]
