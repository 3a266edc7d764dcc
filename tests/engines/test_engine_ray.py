"""The vllm engine inside a Ray actor with less than 2 CPUs (how GenerationActor hosts it)."""

from __future__ import annotations

import pytest
import torch

from engine_fixtures import ENGINE_TEST_CFG, PYTHON_PROMPT, PYTHON_TARGET, LearnerState, teacher_forced_logprobs
from tepo_ray.engines import vllm_available

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.vllm]


def _engine_host_class(engine_cfg: dict) -> type:
    """A plain class made an actor in the test; defined in a function so Ray ships it by value."""

    class EngineHost:
        def __init__(self, model_path: str) -> None:
            from tepo_ray.config import EngineConfig, EngineName
            from tepo_ray.engines import make_engine

            self.engine = make_engine(EngineConfig(name=EngineName.VLLM, **engine_cfg), model_path=model_path)

        def ready(self) -> bool:
            return self.engine.ready()

        def call(self, method: str, *args, **kwargs):
            return getattr(self.engine, method)(*args, **kwargs)

        def shutdown(self) -> None:
            self.engine.shutdown()

    return EngineHost


@pytest.mark.parametrize("num_cpus", [1, 0.5])
def test_vllm_engine_in_ray_actor_syncs_weights(learner_state: LearnerState, num_cpus: float) -> None:
    ok, why = vllm_available()
    if not ok:
        pytest.skip(why)
    import ray

    from tepo_ray.engines import GenerationRequest

    ls = learner_state
    own = not ray.is_initialized()  # reuse a session's Ray (other tests' fixtures) if one is up
    if own:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    host = None
    try:
        host = ray.remote(num_cpus=num_cpus)(_engine_host_class(ENGINE_TEST_CFG)).remote(ls.model_dir)
        assert ray.get(host.ready.remote(), timeout=300)
        seq = ls.ids(PYTHON_PROMPT + PYTHON_TARGET)
        ray.get(host.call.remote("update_weights", str(ls.trained_weights), version=1))
        got = torch.tensor(ray.get(host.call.remote("sequence_logprobs", [seq]))[0])
        assert (got - teacher_forced_logprobs(ls.learner, seq)).abs().max() < 1e-4
        outs = ray.get(host.call.remote("generate", [GenerationRequest(ls.ids(PYTHON_PROMPT), 40)] * 64,
                                        temperature=0.0, top_p=1.0, stop_token_ids=[ls.tok("</python>")]))
        assert all(o.token_ids == ls.ids(PYTHON_TARGET) and o.finish_reason == "stop" for o in outs)
        ray.get(host.shutdown.remote())
    finally:
        if host is not None:
            ray.kill(host)
        if own:
            ray.shutdown()
