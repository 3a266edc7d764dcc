"""Pilot study: the rule judge, the statistics and the report on hand-built calls (fast, no Ray);
the OpenAI-compatible judge client against a local HTTP endpoint started here; `tepo-ray pilot` on the
tiny model (slow)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tepo_ray.pilot import (
    INJECTED_FAILURE,
    CallRecord,
    InjectingTools,
    OpenAIJudge,
    mean_ci,
    pilot_statistics,
    rule_judge,
    write_pilot_report,
)


def call(obs: str, *, gold: str = "371931", dh: float = 0.0, error: str | None = None, tool: str = "python",
         question: str = "What is 623 * 597?") -> CallRecord:
    return CallRecord(item_id="i", question=question, gold=[gold], tool=tool, argument="print(623 * 597)",
                      observation=obs, error=error, delta_entropy=dh)


@pytest.mark.parametrize("obs,error,useful,reason", [
    ("371931\n", None, True, "contains_gold"),
    ("371931.0\n", None, True, "exact_value"),
    ("371,931\n", None, True, "contains_gold"),  # punctuation is normalised away
    ("3719310\n", None, False, "irrelevant"),  # contains the digits, not the value
    ("123\n", None, False, "irrelevant"),
    (INJECTED_FAILURE, "injected_failure", False, "failed"),
    ("Traceback (most recent call last):\n  ...\nSyntaxError: '(' was never closed\n[exit code 1]", "exception",
     False, "failed"),
])
def test_rule_judge_math(obs: str, error: str | None, useful: bool, reason: str) -> None:
    assert rule_judge(call(obs, error=error)) == (useful, reason)


def test_rule_judge_qa_needs_the_gold_entity_not_another() -> None:
    q = "Where was Zorvath born?"
    good = call("Zorvath\nZorvath is a painter born in Quellmar in 1821.", gold="Quellmar", tool="search", question=q)
    bad = call("Brindle\nBrindle is a river in Osk.", gold="Quellmar", tool="search", question=q)
    assert rule_judge(good) == (True, "contains_gold")
    assert rule_judge(bad) == (False, "irrelevant")


def test_mean_ci_matches_a_worked_example() -> None:
    s = mean_ci([1.0, 2.0, 3.0, 4.0], confidence=0.95)
    # mean 2.5, sample std sqrt(5/3), t_{0.975, 3} = 3.18245
    half = 3.182446305284263 * (5 / 3) ** 0.5 / 2
    assert s["n"] == 4 and s["mean"] == pytest.approx(2.5) and s["median"] == pytest.approx(2.5)
    assert s["ci_low"] == pytest.approx(2.5 - half) and s["ci_high"] == pytest.approx(2.5 + half)
    assert mean_ci([], confidence=0.95)["mean"] is None
    assert mean_ci([1.0])["ci_low"] is None


def _judged(dhs_useful: list[float], dhs_useless: list[float]) -> list[CallRecord]:
    calls = [call("371931\n", dh=d) for d in dhs_useful] + [call("42\n", dh=d) for d in dhs_useless]
    for c in calls:
        c.useful, c.reason = rule_judge(c)
    return calls


def test_statistics_separate_classes_and_detect_a_shift() -> None:
    useful = [-0.05 + 0.001 * i for i in range(20)]  # all below every useless value
    useless = [0.02 + 0.001 * i for i in range(20)]
    st = pilot_statistics(_judged(useful, useless))
    assert st["useful"]["n"] == 20 and st["useless"]["n"] == 20
    assert st["useful"]["mean"] == pytest.approx(sum(useful) / 20)
    assert st["mannwhitney"]["effect_auc"] == pytest.approx(1.0)
    assert st["mannwhitney"]["p_less"] < 1e-6
    assert st["mannwhitney"]["p_two_sided"] == pytest.approx(2 * st["mannwhitney"]["p_less"], rel=1e-6)
    # the reverse ordering is not significant one-sided
    rev = pilot_statistics(_judged(useless, useful))
    assert rev["mannwhitney"]["p_less"] > 0.99 and rev["mannwhitney"]["effect_auc"] == pytest.approx(0.0)


def test_statistics_with_one_empty_class_report_no_test() -> None:
    st = pilot_statistics(_judged([-0.1, -0.2], []))
    assert st["mannwhitney"] is None and st["useless"]["n"] == 0


def test_report_files(tmp_path: Path) -> None:
    calls = _judged([-0.04, -0.03, -0.05], [0.01, 0.02, -0.01])
    calls[-1].injected = "irrelevant"
    res = write_pilot_report(calls, out_dir=tmp_path, meta={"model_path": "m", "judge": "rule", "items": 3,
                                                             "samples_per_item": 2, "inject_rate": 0.3,
                                                             "inject_kinds": ["irrelevant"]})
    js = json.loads((tmp_path / "pilot.json").read_text())
    assert js["statistics"]["useful"]["n"] == 3 and len(js["calls"]) == 6
    assert js["statistics"]["by_injection"]["irrelevant"]["n"] == 1
    md = (tmp_path / "pilot.md").read_text()
    assert "| useful | 3 | -40.00 |" in md and "-37.27" in md and "Mann–Whitney" in md
    assert (tmp_path / "pilot.png").stat().st_size > 1000
    assert res["plot"].endswith("pilot.png")


def test_injecting_tools_replace_a_share_and_label_it() -> None:
    import asyncio

    tools = InjectingTools(tools={"python": lambda code: (f"{len(code)}\n", None)}, rate=0.5,
                           kinds=["irrelevant", "fail"], seed=0)

    async def many():
        return [await tools.call("python", "x" * i) for i in range(1, 201)]

    outs = asyncio.run(many())
    injected = [o for i, o in enumerate(outs, 1) if o.observation != f"{i}\n"]
    assert 60 < len(injected) < 140  # about half
    assert len(tools.injected) == len(injected)
    assert {k for k in tools.injected.values()} == {"irrelevant", "fail"}
    assert all(o.error == "injected_failure" for o in injected if o.observation == INJECTED_FAILURE)


class _JudgeEndpoint(BaseHTTPRequestHandler):
    """A local OpenAI-compatible /v1/chat/completions endpoint: answers 1 iff the observation holds the reference."""

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][0]["content"]
        ref = prompt.split("Reference answer: ")[1].split("\n")[0]
        obs = prompt.split("Observation: ")[1].split("\nDid this")[0]
        reply = {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                 "choices": [{"index": 0, "finish_reason": "stop",
                              "message": {"role": "assistant", "content": "1" if ref in obs else "0"}}]}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


def test_openai_judge_client_against_a_local_endpoint() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _JudgeEndpoint)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        judge = OpenAIJudge(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", model="judge", timeout_s=10)
        assert judge(call("371931\n")) == (True, "llm")
        assert judge(call("12\n")) == (False, "llm")
    finally:
        server.shutdown()


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_pilot_command_on_the_tiny_model(tmp_path: Path, e2e_cache: Path) -> None:
    from typer.testing import CliRunner

    from e2e_configs import CONFIGS
    from tepo_ray.cli import app

    tiny = [f"model.cache_dir={e2e_cache}", "model.num_layers=2", "model.intermediate_size=256",
            "model.vocab_size=384", "data.num_train=256", "trainer.sft_steps=120", "trainer.sft_batch_size=32",
            "engine.max_new_tokens=64", "engine.max_turn_tokens=40", "engine.max_context=160", "logging.progress=false"]
    res = CliRunner().invoke(app, ["pilot", str(CONFIGS / "pilot.yaml"), "--out", str(tmp_path / "pilot"), *tiny,
                                   "data.num_eval=8", "pilot.num_items=8", "pilot.samples_per_item=2",
                                   "pilot.inject_rate=0.5"])
    assert res.exit_code == 0, res.output
    js = json.loads((tmp_path / "pilot" / "pilot.json").read_text())
    meta, st = js["meta"], js["statistics"]
    assert meta["trajectories"] == 2 * meta["items"] and meta["items"] >= 6  # held-out items seen in train are dropped
    assert st["useful"]["n"] + st["useless"]["n"] + st["unjudged"] == meta["calls_with_delta_h"] > 0
    assert len(js["calls"]) == meta["calls_with_delta_h"]
    assert all(c["useful"] is False for c in js["calls"] if c["injected"])  # an injected call is never useful
    assert all(isinstance(c["delta_entropy"], float) for c in js["calls"])
    assert (tmp_path / "pilot" / "pilot.png").exists() and "Mann" in (tmp_path / "pilot" / "pilot.md").read_text()
