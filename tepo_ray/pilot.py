"""Pilot study: is the entropy change after a tool call a signal of the call's usefulness?

The paper's pilot (arXiv 2602.02050, section 3) samples trajectories, has a
judge score every tool call as useful (1) or not (0), and compares ΔH_k (mean
token entropy of the reasoning after call k minus the one before it, DESIGN.md
section 1) between the classes: useful calls reduce entropy (score-1 calls:
ΔH = −37.27 × 10⁻³ and −41.03 × 10⁻³ on its two math settings, `PAPER_REFERENCE`).

What `run_pilot` does, in order:

1. Samples `pilot.samples_per_item` trajectories per held-out item with the
   given policy (SFT checkpoint, or a run's `weights/v{N}.safetensors`) through
   the same agent loop as training, in this process, with the real Python
   sandbox and search index. With probability `pilot.inject_rate` a call's
   real observation is replaced by a useless one (`InjectingTools`): an
   "irrelevant" observation (another call's output) or a "fail" (an error
   text) — so both classes appear even when the policy's own calls are all good.
2. Scores the trajectories with the behaviour policy (`EntropyScorer`): exact
   entropies and ΔH_k per call.
3. Judges every call with a ΔH defined: `rule_judge` (useful iff the call
   succeeded and its observation holds the gold answer or a number equal to
   it) or `OpenAIJudge` (an LLM through any OpenAI-compatible endpoint, e.g. a
   local `vllm serve`, as the paper's LLM-as-judge).
4. Reports per class: n, mean ΔH with a t-interval, median; a Mann–Whitney U
   test (useful < useless, one-sided, and two-sided); a violin + histogram PNG;
   `pilot.json` and `pilot.md` in the output directory.

Steps 3–4 are plain functions on `CallRecord`s (`pilot_statistics`,
`plot_pilot`, `write_pilot_report`), testable without models or Ray.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import re
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from tepo_ray.algo.scoring import normalize_answer

__all__ = [
    "PAPER_REFERENCE",
    "CallRecord",
    "rule_judge",
    "OpenAIJudge",
    "InjectingTools",
    "mean_ci",
    "pilot_statistics",
    "plot_pilot",
    "write_pilot_report",
    "run_pilot",
]

# The paper's pilot (ΔH × 10⁻³ of score-1 tool calls on its two math settings).
PAPER_REFERENCE = {
    "source": "arXiv 2602.02050, pilot study",
    "useful_delta_h_x1e3": [-37.27, -41.03],
    "note": "score-1 (useful) tool calls reduce entropy on math; ΔH in nats, x 1e-3",
}

INJECTED_FAILURE = "error: Traceback (most recent call last): RuntimeError: tool backend unavailable"
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:e[+-]?\d+)?", re.IGNORECASE)


@dataclass
class CallRecord:
    """One judged tool call."""

    item_id: str
    question: str
    gold: list[str]
    tool: str
    argument: str
    observation: str
    error: str | None
    delta_entropy: float
    injected: str | None = None  # None | "irrelevant" | "fail"
    useful: bool | None = None
    reason: str = ""
    trajectory_score: float | None = None


# --------------------------------------------------------------------------- judges
def _numbers(text: str) -> list[float]:
    out = []
    for m in _NUMBER.findall(text):
        try:
            out.append(float(m))
        except ValueError:
            continue
    return out


def rule_judge(call: CallRecord) -> tuple[bool, str]:
    """(useful, reason): a failed call is useless; a successful one is useful iff its observation holds the gold.

    "Holds the gold": a normalised gold alias occurs in the normalised
    observation, or (numeric golds) a number in the observation equals it (the
    exact computed value). Anything else — another entity's document, a wrong
    or unrelated number — is "irrelevant".
    """
    obs = call.observation or ""
    if call.error or obs.lstrip().lower().startswith("error") or "Traceback" in obs:
        return False, "failed"
    norm_obs = f" {normalize_answer(obs)} "
    for gold in call.gold:
        g = normalize_answer(gold)
        if g and f" {g} " in norm_obs:
            return True, "contains_gold"
        try:
            value = float(gold.replace(",", ""))
        except ValueError:
            continue
        if any(math.isclose(x, value, rel_tol=0.0, abs_tol=1e-9) for x in _numbers(obs.replace(",", ""))):
            return True, "exact_value"
    return False, "irrelevant"


class OpenAIJudge:
    """LLM-as-judge through an OpenAI-compatible chat endpoint (the `openai` client; e.g. `vllm serve MODEL`).

    Asks whether the observation helps answer the question (the paper's 0/1 call
    score) and parses the first 0/1 of the reply; an unparsable reply is
    "unjudged" (None), counted, never guessed.
    """

    PROMPT = ("You judge one tool call of an agent. Question: {question}\nReference answer: {gold}\n"
              "Tool: {tool}\nCall: {argument}\nObservation: {observation}\n"
              "Did this observation give information that helps reach the reference answer? "
              "Reply with 1 (useful) or 0 (useless) only.")

    def __init__(self, *, base_url: str, model: str, api_key: str = "EMPTY", timeout_s: float = 30.0) -> None:
        from openai import OpenAI

        self.client = OpenAI(base_url=base_url, api_key=api_key, timeout=timeout_s, max_retries=1)
        self.model = model

    def __call__(self, call: CallRecord) -> tuple[bool | None, str]:
        prompt = self.PROMPT.format(question=call.question, gold=" | ".join(call.gold), tool=call.tool,
                                    argument=call.argument[:500], observation=call.observation[:1500])
        resp = self.client.chat.completions.create(
            model=self.model, messages=[{"role": "user", "content": prompt}], temperature=0.0, max_tokens=4)
        text = (resp.choices[0].message.content or "").strip()
        m = re.search(r"[01]", text)
        if m is None:
            return None, f"unparsable judge reply {text[:40]!r}"
        return m.group(0) == "1", "llm"


# --------------------------------------------------------------------------- statistics
def mean_ci(values: Sequence[float], *, confidence: float = 0.95) -> dict[str, Any]:
    """n, mean, std, median and a Student-t confidence interval of the mean (None where undefined)."""
    from scipy import stats

    n = len(values)
    if n == 0:
        return {"n": 0, "mean": None, "std": None, "median": None, "ci_low": None, "ci_high": None}
    mean = sum(values) / n
    median = float(statistics.median(values))
    if n < 2:
        return {"n": n, "mean": mean, "std": None, "median": median, "ci_low": None, "ci_high": None}
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "median": median, "ci_low": mean - half, "ci_high": mean + half}


def pilot_statistics(calls: Sequence[CallRecord], *, confidence: float = 0.95) -> dict[str, Any]:
    """Per-class ΔH summaries and a Mann–Whitney U test of useful vs useless calls.

    `mannwhitney.p_less`: one-sided p for "useful calls have lower ΔH" (the
    paper's claim); `p_two_sided` as well; `effect_auc` = P(ΔH_useful < ΔH_useless)
    (+ half the ties), U / (n1·n2). Undefined parts are None when a class is empty.
    """
    from scipy import stats

    useful = [c.delta_entropy for c in calls if c.useful is True]
    useless = [c.delta_entropy for c in calls if c.useful is False]
    out: dict[str, Any] = {
        "confidence": confidence,
        "useful": mean_ci(useful, confidence=confidence),
        "useless": mean_ci(useless, confidence=confidence),
        "unjudged": sum(1 for c in calls if c.useful is None),
        "by_reason": {},
        "by_injection": {},
    }
    for key, attr in (("by_reason", "reason"), ("by_injection", "injected")):
        groups: dict[str, list[float]] = {}
        for c in calls:
            groups.setdefault(str(getattr(c, attr) or "none"), []).append(c.delta_entropy)
        out[key] = {k: mean_ci(v, confidence=confidence) for k, v in sorted(groups.items())}
    if useful and useless:
        less = stats.mannwhitneyu(useful, useless, alternative="less")
        two = stats.mannwhitneyu(useful, useless, alternative="two-sided")
        # scipy's U is for the first sample: U = #(useful > useless) + ties/2, so P(useful < useless) = 1 - U/(n1 n2)
        auc = 1.0 - float(two.statistic) / (len(useful) * len(useless))
        out["mannwhitney"] = {"u": float(two.statistic), "p_less": float(less.pvalue),
                              "p_two_sided": float(two.pvalue), "effect_auc": auc}
        out["mean_difference"] = out["useful"]["mean"] - out["useless"]["mean"]
    else:
        out["mannwhitney"] = None
        out["mean_difference"] = None
    return out


def plot_pilot(calls: Sequence[CallRecord], out_path: str | Path) -> Path:
    """Violin plot and histogram of ΔH per class (useful / useless), PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = [("useful", [c.delta_entropy for c in calls if c.useful is True], "tab:green"),
               ("useless", [c.delta_entropy for c in calls if c.useful is False], "tab:red")]
    fig, (ax_v, ax_h) = plt.subplots(1, 2, figsize=(11, 4))
    present = [(name, vals, color) for name, vals, color in classes if vals]
    if present:
        parts = ax_v.violinplot([v for _, v, _ in present], showmeans=True, showmedians=False)
        for body, (_, _, color) in zip(parts["bodies"], present):
            body.set_facecolor(color)
        ax_v.set_xticks(range(1, len(present) + 1), [f"{n} (n={len(v)})" for n, v, _ in present])
    for name, vals, color in present:
        ax_h.hist(vals, bins=30, alpha=0.5, color=color, label=f"{name} (n={len(vals)})")
    for ax in (ax_v, ax_h):
        ax.axhline(0.0, color="k", lw=0.6) if ax is ax_v else ax.axvline(0.0, color="k", lw=0.6)
    ax_v.set_ylabel("ΔH (nats)")
    ax_v.set_title("ΔH after a tool call, by judged usefulness")
    ax_h.set_xlabel("ΔH (nats)")
    ax_h.set_title("ΔH histogram")
    if present:
        ax_h.legend(fontsize=8)
    fig.tight_layout()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=90)
    plt.close(fig)
    return out_path


def _fmt(x: Any, scale: float = 1.0, digits: int = 2) -> str:
    return "–" if x is None else f"{x * scale:.{digits}f}"


def write_pilot_report(calls: Sequence[CallRecord], *, out_dir: str | Path, meta: dict[str, Any],
                       confidence: float = 0.95) -> dict[str, Any]:
    """Write pilot.json (statistics, meta, every call), pilot.md and pilot.png into `out_dir`; return the JSON."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stats = pilot_statistics(calls, confidence=confidence)
    plot = plot_pilot(calls, out / "pilot.png")
    result = {"meta": meta, "statistics": stats, "paper_reference": PAPER_REFERENCE, "plot": str(plot),
              "calls": [asdict(c) for c in calls]}
    (out / "pilot.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    pct = int(round(confidence * 100))
    lines = [
        "# Pilot study: ΔH of useful vs useless tool calls", "",
        f"Policy: `{meta.get('model_path')}`{' + weights ' + str(meta['weights']) if meta.get('weights') else ''}; "
        f"judge: {meta.get('judge')}; {meta.get('items')} held-out items × {meta.get('samples_per_item')} samples; "
        f"injection rate {meta.get('inject_rate')} ({', '.join(meta.get('inject_kinds') or [])}).", "",
        f"| class | n | mean ΔH (×10⁻³) | {pct}% CI (×10⁻³) | median ΔH (×10⁻³) |", "|---|---|---|---|---|",
    ]
    for name in ("useful", "useless"):
        s = stats[name]
        lines.append(f"| {name} | {s['n']} | {_fmt(s['mean'], 1e3)} | [{_fmt(s['ci_low'], 1e3)}, "
                     f"{_fmt(s['ci_high'], 1e3)}] | {_fmt(s['median'], 1e3)} |")
    lines += ["", "By judge reason / injection (mean ΔH ×10⁻³, n):", ""]
    for key in ("by_reason", "by_injection"):
        parts = [f"{k}: {_fmt(v['mean'], 1e3)} (n={v['n']})" for k, v in stats[key].items()]
        lines.append(f"* {key.removeprefix('by_')}: " + "; ".join(parts))
    mw = stats["mannwhitney"]
    lines += [""]
    if mw:
        lines.append(f"Mann–Whitney U = {mw['u']:.1f}; one-sided p (useful < useless) = {mw['p_less']:.3g}; "
                     f"two-sided p = {mw['p_two_sided']:.3g}; P(ΔH_useful < ΔH_useless) = {mw['effect_auc']:.3f}.")
    else:
        lines.append("Mann–Whitney U: not defined (one class is empty).")
    lines += ["", f"Paper reference ({PAPER_REFERENCE['source']}): useful (score-1) calls ΔH = "
              + " / ".join(f"{x} × 10⁻³" for x in PAPER_REFERENCE["useful_delta_h_x1e3"]) + " on math.",
              f"Unjudged calls: {stats['unjudged']}. Plot: `{Path(plot).name}`."]
    (out / "pilot.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return result


# --------------------------------------------------------------------------- sampling
class InjectingTools:
    """Real tools (Python sandbox, search index) with a seeded share of observations replaced by useless ones.

    A fault injector (the one fake the pilot uses): with probability `rate` a
    call's real observation becomes "irrelevant" (the observation of an earlier
    call, else an unrelated number) or "fail" (an error). `injected` maps
    (tool, argument, observation) to the kind, to label the calls afterwards.
    """

    def __init__(self, *, tools: dict[str, Callable[[str], tuple[str, str | None]]], rate: float,
                 kinds: Sequence[str], seed: int) -> None:
        self.tools = tools
        self.rate = rate
        self.kinds = list(kinds)
        self.rng = random.Random(seed)
        self.seen: list[str] = []
        self.injected: dict[tuple[str, str, str], str] = {}

    async def call(self, tool: str, argument: str) -> Any:
        from tepo_ray.rollout import ToolOutcome

        fn = self.tools.get(tool)
        if fn is None:
            return ToolOutcome(f"error: tool '{tool}' is not available", "unavailable", 0.0)
        t0 = time.perf_counter()
        obs, err = await asyncio.to_thread(fn, argument)
        latency = time.perf_counter() - t0
        if self.kinds and self.rng.random() < self.rate:
            kind = self.rng.choice(self.kinds)
            if kind == "fail":
                obs, err = INJECTED_FAILURE, "injected_failure"
            else:
                others = [o for o in self.seen if o != obs]
                obs = self.rng.choice(others) if others else f"{self.rng.randint(100000, 999999)}\n"
                err = None
            self.injected[(tool, argument, obs)] = kind
        else:
            self.seen.append(obs)
        return ToolOutcome(obs, err, latency)


def run_pilot(cfg: Any, *, out_dir: str | Path, model_path: str | None = None, weights: str | None = None,
              progress: bool = False) -> dict[str, Any]:
    """Sample, score, judge and report (module docstring). No Ray: engine, tools and scorer run in-process."""
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer

    from tepo_ray.agent import stop_token_ids
    from tepo_ray.algo import outcome_scores
    from tepo_ray.prepare import prepare_data
    from tepo_ray.engines import make_engine
    from tepo_ray.rollout import AgentLoop, EngineBatcher
    from tepo_ray.tools.python_sandbox import PythonSandbox, format_observation
    from tepo_ray.trainer.scorer import EntropyScorer

    p = cfg.pilot
    data = prepare_data(cfg, progress=progress)
    model_path = model_path or data.model_path
    items = data.eval_items[: p.num_items]
    if not items:
        raise ValueError("no held-out items: data.num_eval is 0")
    judge: Callable[[CallRecord], tuple[bool | None, str]]
    judge = rule_judge if p.judge == "rule" else OpenAIJudge(
        base_url=p.judge_base_url, model=p.judge_model, api_key=p.judge_api_key, timeout_s=p.judge_timeout_s)

    tools: dict[str, Callable[[str], tuple[str, str | None]]] = {}
    sandbox = PythonSandbox.from_config(cfg.tools.python)
    max_obs = cfg.tools.max_observation_chars

    def run_python(code: str) -> tuple[str, str | None]:
        res = sandbox.run(code)
        return (format_observation(res, max_chars=cfg.tools.python.max_output_chars)[:max_obs],
                None if res.ok else str(getattr(res.error, "value", res.error)))

    tools["python"] = run_python
    if data.index_dir:
        from tepo_ray.tools.retrieval import format_hits, open_retriever

        retriever = open_retriever(data.index_dir)

        def search(query: str) -> tuple[str, str | None]:
            hits = retriever.search([query], top_k=cfg.tools.search.top_k)[0]
            return format_hits(hits, max_chars=cfg.tools.search.max_doc_chars)[:max_obs], None

        tools["search"] = search
    router = InjectingTools(tools=tools, rate=p.inject_rate, kinds=p.inject_kinds, seed=p.seed)

    engine_cfg = OmegaConf.merge(cfg.engine, {"temperature": p.temperature, "seed": p.seed})
    tok = AutoTokenizer.from_pretrained(model_path)
    engine = make_engine(engine_cfg, model_path=model_path)
    version = 0
    if weights:
        version = 1
        engine.update_weights(str(weights), version=version)
    stops = stop_token_ids(tok) + ([tok.eos_token_id] if tok.eos_token_id is not None else [])
    batcher = EngineBatcher(engine, sampling=dict(temperature=p.temperature, top_p=engine_cfg.top_p,
                                                  stop_token_ids=stops))
    loop = AgentLoop(batcher=batcher, tokenizer=tok, tools=router, engine_cfg=engine_cfg,
                     max_observation_chars=max_obs, eos_token_id=tok.eos_token_id)
    t0 = time.perf_counter()
    try:
        async def sample() -> list[Any]:
            groups = await asyncio.gather(*[loop.rollout_group(it, group_id=f"pilot-{it['id']}",
                                                               group_size=p.samples_per_item) for it in items])
            return [t for g in groups for t in g]

        trajs = asyncio.run(sample())
    finally:
        engine.shutdown()
        sandbox.close()
    t_sample = time.perf_counter() - t0

    scorer = EntropyScorer(model_path, algo_cfg=cfg.algo)
    if weights:
        scorer.register_weights(str(weights), version)
    scorer.score(trajs)
    scores = outcome_scores([t.answer for t in trajs], [t.gold for t in trajs], task_types=[t.task_type for t in trajs])
    by_id = {str(it["id"]): it for it in items}
    calls: list[CallRecord] = []
    for t, s in zip(trajs, scores.tolist()):
        item = by_id[t.prompt_id]
        for c in t.tool_calls:
            if c.delta_entropy is None:  # no reasoning after the call (e.g. cut by a limit): ΔH undefined
                continue
            rec = CallRecord(item_id=t.prompt_id, question=item["question"], gold=list(t.gold), tool=c.tool,
                             argument=c.argument, observation=c.observation, error=c.error,
                             delta_entropy=float(c.delta_entropy),
                             injected=router.injected.get((c.tool, c.argument, c.observation)),
                             trajectory_score=float(s))
            rec.useful, rec.reason = judge(rec)
            calls.append(rec)
    meta = {"model_path": str(model_path), "weights": str(weights) if weights else None, "judge": p.judge,
            "judge_model": p.judge_model, "items": len(items), "samples_per_item": p.samples_per_item,
            "trajectories": len(trajs), "calls_total": sum(t.num_calls for t in trajs), "calls_with_delta_h": len(calls),
            "inject_rate": p.inject_rate, "inject_kinds": list(p.inject_kinds), "temperature": p.temperature,
            "engine": str(getattr(cfg.engine.name, "value", cfg.engine.name)), "sample_s": round(t_sample, 2),
            "entropy_window": cfg.algo.entropy_window, "accuracy": sum(1 for s in scores.tolist() if s >= 1.0) / len(trajs)}
    return write_pilot_report(calls, out_dir=out_dir, meta=meta, confidence=p.confidence)
