"""`tepo-ray` command line (typer).

    tepo-ray demo                                  # embedded defaults end to end (what `make demo` runs)
    tepo-ray train CONFIG [key=value ...] [--address ADDR] [--resume RUN_DIR]
    tepo-ray sft CONFIG [key=value ...]            # SFT warm start; prints the checkpoint dir
    tepo-ray eval CONFIG [key=value ...] [--model DIR] [--data NAME=PATH ...] [--limit N] [--out DIR]
    tepo-ray submit CONFIG [key=value ...] --address http://HEAD:8265
    tepo-ray topology CONFIG [key=value ...]       # bundles and resource needs; starts nothing
    tepo-ray index build CORPUS.jsonl --out DIR [--backend bm25|chroma]
    tepo-ray compare RUN_DIR [RUN_DIR ...] --out plot.png
    tepo-ray export RUN_DIR [--step K] --out DIR   # checkpoint -> Hugging Face model dir (safetensors)
    tepo-ray pilot CONFIG [key=value ...] --out DIR [--weights RUN_DIR/weights/vN.safetensors]
    tepo-ray sweep CONFIG [key=value ...] --out DIR [--address ADDR]   # GRPO vs sparse vs dense, seeds
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.console import Console

from tepo_ray.config import ConfigError, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True, help="TEPO training on Ray.")
console = Console()
# Errors go to stderr, unwrapped: a dotted key or a path is never split across lines.
err_console = Console(stderr=True, soft_wrap=True)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO_ROOT / "experiments" / "configs" / "demo.yaml"
DEMO_EVAL_SAMPLES = 4  # samples per held-out item in the demo's before/after table

try:
    from tepo_ray.tools.retrieval.cli import index_app

    app.add_typer(index_app, name="index", help="Build and query search indexes.")
except ImportError:  # pragma: no cover - retrieval extras missing
    pass


tools_app = typer.Typer(no_args_is_help=True, help="Long-lived tool services shared by several runs.")
app.add_typer(tools_app, name="tools")


@tools_app.command("serve")
def tools_serve(config: Path = typer.Argument(..., help="YAML config (its tools.search and data sections)"),
                overrides: List[str] = typer.Argument(None, help="dotlist overrides"),
                name: str = typer.Option("search", help="service name; runs set tools.search.service=NAME"),
                address: Optional[str] = typer.Option(None, help="Ray cluster address (default: RAY_ADDRESS)")
                ) -> None:
    """Start a detached, named search pool on the cluster (one index, many runs); returns when it is ready."""
    import os

    import ray

    from tepo_ray.prepare import prepare_search_index
    from tepo_ray.tool_pools import SERVICE_NAMESPACE, start_service

    cfg = _load(config, overrides or [])
    index_dir = prepare_search_index(cfg, progress=cfg.logging.progress)
    ray.init(address=address or os.environ.get("RAY_ADDRESS") or "auto", namespace=SERVICE_NAMESPACE,
             include_dashboard=False)
    start_service(cfg, "search", name=name, index_dir=index_dir)
    console.print(f"[bold green]search service[/bold green] {name!r} (namespace {SERVICE_NAMESPACE}) is up on "
                  f"index {index_dir}; runs use it with tools.search.service={name}", highlight=False)


@tools_app.command("stop")
def tools_stop(name: str = typer.Option("search", help="service name"),
               address: Optional[str] = typer.Option(None, help="Ray cluster address (default: RAY_ADDRESS)")
               ) -> None:
    """Shut down a named tool service."""
    import os

    import ray

    from tepo_ray.tool_pools import stop_service

    ray.init(address=address or os.environ.get("RAY_ADDRESS") or "auto", include_dashboard=False)
    if not stop_service(name):
        err_console.print(f"[red]error:[/red] no tool service named {name!r} runs on this cluster", highlight=False)
        raise typer.Exit(2)
    console.print(f"stopped {name!r}")


def _load(config: Optional[Path], overrides: List[str]) -> Any:
    try:
        return load_config([config] if config else [], overrides)
    except ConfigError as exc:
        err_console.print(f"[red]config error:[/red] {exc}", highlight=False)
        raise typer.Exit(2) from None


def _print_summary(summary: dict[str, Any]) -> None:
    console.print(f"[bold green]run directory:[/bold green] {summary['run_dir']}")
    console.print(f"[bold green]metrics file:[/bold green]  {summary['metrics']}")
    if summary.get("wandb_dir"):
        console.print(f"[bold green]W&B run:[/bold green]       {summary['wandb_dir']}  "
                      f"(offline; upload with `wandb sync {summary['wandb_dir']}`)")
    if summary.get("plot"):
        console.print(f"[bold green]curves:[/bold green]        {summary['plot']}")


@app.command()
def train(config: Path = typer.Argument(..., help="YAML config"),
          overrides: List[str] = typer.Argument(None, help="dotlist overrides, e.g. algo.mode=dense"),
          address: Optional[str] = typer.Option(None, help="Ray address (else RAY_ADDRESS or a local cluster)"),
          resume: Optional[Path] = typer.Option(None, help="run directory to resume from its last checkpoint")) -> None:
    """RL training (TEPO-sparse, TEPO-dense or GRPO)."""
    from tepo_ray.driver import train as run_train

    if resume is not None and not resume.is_dir():
        console.print(f"[red]--resume {resume}: not a directory[/red]")
        raise typer.Exit(2)
    from tepo_ray.data.tasks import TaskError

    cfg = _load(config, overrides or [])
    if resume is not None and (resume / "config.yaml").exists() and not overrides:
        cfg = _load(resume / "config.yaml", [])
    try:
        summary = run_train(cfg, resume=str(resume) if resume else None, address=address)
    except TaskError as exc:  # bad or missing training data: one line naming the key, before any actor starts
        err_console.print(f"[red]data error:[/red] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    _print_summary(summary)


@app.command()
def demo(overrides: List[str] = typer.Argument(None, help="dotlist overrides on demo.yaml")) -> None:
    """Embedded defaults end to end: tiny model, SFT warm start, TEPO-dense on a local Ray, then the SFT
    and the trained model evaluated on the same held-out split."""
    from tepo_ray.driver import train as run_train

    cfg = _load(DEMO_CONFIG if DEMO_CONFIG.exists() else None, overrides or [])
    t0 = time.perf_counter()
    summary = run_train(cfg)
    _print_summary(summary)
    if cfg.data.num_eval:
        _demo_eval(cfg, Path(summary["run_dir"]))
    console.print(f"[bold green]demo wall time:[/bold green] {time.perf_counter() - t0:.0f} s")


def _demo_eval(cfg: Any, run_dir: Path) -> None:
    """SFT vs trained policy on the held-out split: a small table and the accuracy difference with its noise."""
    from rich.table import Table

    from tepo_ray.prepare import prepare_data
    from tepo_ray.sweep import eval_policy, final_policy, paired_bootstrap

    sft_path = prepare_data(cfg, progress=False).model_path
    # Sampled at the training temperature (what RL optimises), DEMO_EVAL_SAMPLES per item, one engine seed for
    # both models; the SFT model is evaluated again with a second seed to measure the seed noise.
    temp = float(cfg.engine.temperature)
    kw = dict(temperature=temp, samples=DEMO_EVAL_SAMPLES)
    sft = eval_policy(cfg, model_path=sft_path, out_dir=run_dir / "eval" / "sft", seed=0, **kw)
    sft2 = eval_policy(cfg, model_path=sft_path, out_dir=run_dir / "eval" / "sft-seed1", seed=1, entropy=False, **kw)
    final_model, final_weights = final_policy(run_dir, sft_path=sft_path)
    rl = eval_policy(cfg, model_path=final_model, weights=final_weights, out_dir=run_dir / "eval" / "trained",
                     seed=0, **kw)
    n_items = len(sft["item_ids"])
    table = Table(title=f"held-out eval: {n_items} items × {DEMO_EVAL_SAMPLES} samples at temperature {temp:g}, "
                        f"real tools")
    for col in ("model", "accuracy", "score", "calls / question", "efficiency (score/call)", "m/n", "mean ΔH"):
        table.add_column(col)

    def fmt(x: Any, d: int = 3) -> str:
        return "–" if x is None else f"{x:.{d}f}"

    mode = getattr(cfg.algo.mode, "value", cfg.algo.mode)
    for name, r in (("SFT", sft), (f"trained ({mode}, {cfg.trainer.steps} steps)", rl)):
        table.add_row(name, fmt(r["accuracy"]), fmt(r["score_mean"]), fmt(r["calls_per_traj"], 2),
                      fmt(r["efficiency"]), fmt(r.get("m_over_n"), 2), fmt(r.get("delta_h_mean"), 4))
    console.print(table)
    acc = paired_bootstrap(sft["item_correct"], rl["item_correct"])
    calls = paired_bootstrap(sft["item_calls"], rl["item_calls"])
    noise = paired_bootstrap(sft["item_correct"], sft2["item_correct"])
    verdict = ("larger than its noise (95% CI excludes 0)" if acc["ci_low"] > 0 or acc["ci_high"] < 0
               else "within its noise (95% CI includes 0)")
    console.print(f"accuracy trained − SFT: {acc['diff']:+.3f}, 95% CI [{acc['ci_low']:+.3f}, {acc['ci_high']:+.3f}] "
                  f"— {verdict}; calls/question {calls['diff']:+.2f} [{calls['ci_low']:+.2f}, {calls['ci_high']:+.2f}]. "
                  f"Noise: paired bootstrap over items; the same SFT model with another sampling seed differs by "
                  f"{noise['diff']:+.3f} [{noise['ci_low']:+.3f}, {noise['ci_high']:+.3f}].", highlight=False)
    (run_dir / "eval" / "demo_eval.json").write_text(json.dumps(
        {"sft": {k: v for k, v in sft.items() if not k.startswith("item_")},
         "sft_seed1": {k: v for k, v in sft2.items() if not k.startswith("item_")},
         "trained": {k: v for k, v in rl.items() if not k.startswith("item_")},
         "accuracy_diff": acc, "calls_diff": calls, "seed_noise_accuracy_diff": noise}, indent=1))
    console.print(f"[bold green]eval:[/bold green]          {run_dir / 'eval'}", highlight=False)


@app.command()
def sft(config: Path = typer.Argument(...), overrides: List[str] = typer.Argument(None)) -> None:
    """SFT warm start on tool-use demonstrations (observations masked)."""
    from tepo_ray.prepare import prepare_data

    cfg = _load(config, overrides or [])
    if cfg.trainer.sft_steps <= 0:
        err_console.print("[red]config error:[/red] trainer.sft_steps=0: nothing to train (set it > 0)", highlight=False)
        raise typer.Exit(2)
    if cfg.model.path and not cfg.data.sft_path:
        err_console.print(f"[red]config error:[/red] model.path={cfg.model.path} is set but data.sft_path is null; "
                          f"give the demonstrations as chat-message jsonl: data.sft_path=FILE.jsonl", highlight=False)
        raise typer.Exit(2)
    from tepo_ray.data.tasks import TaskError
    from tepo_ray.trainer.sft import SFTDataError

    try:
        data = prepare_data(cfg, progress=cfg.logging.progress)
    except (SFTDataError, FileNotFoundError, TaskError) as exc:
        err_console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    console.print(f"[bold green]SFT checkpoint:[/bold green] {data.model_path}")
    console.print("`tepo-ray train` with this config starts from it (cached by config); or set "
                  f"model.path={data.model_path}", highlight=False, soft_wrap=True)


@app.command("eval")
def eval_cmd(config: Path = typer.Argument(...), overrides: List[str] = typer.Argument(None),
             model: Optional[str] = typer.Option(None, help="model dir (default: the config's, after SFT)"),
             data: List[str] = typer.Option(None, "--data", help="NAME=PATH (NAME: a loader, e.g. hotpotqa, "
                                            "musique, aime, gsm8k; NAME:LABEL=PATH for two files of one format); "
                                            "repeatable; default: the held-out split"),
             limit: Optional[int] = typer.Option(None, help="first N items of each data set"),
             out: Optional[Path] = typer.Option(None, help="report dir (default runs/eval-<time>)"),
             address: Optional[str] = typer.Option(None)) -> None:
    """Greedy evaluation with real tools: EM/F1/accuracy, tool calls, ΔH per data set; JSON + markdown report."""
    from tepo_ray.data.loaders import DatasetError
    from tepo_ray.evaluate import evaluate

    cfg = _load(config, overrides or [])
    out = out or Path("runs") / f"eval-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        report = evaluate(cfg, model_path=model, datasets=data or [], limit=limit, address=address, out_dir=out)
    except (DatasetError, ValueError) as exc:
        err_console.print(f"[red]eval error:[/red] {exc}", highlight=False)
        raise typer.Exit(2) from None
    console.print_json(json.dumps(report["datasets"]))
    console.print(f"[bold green]report:[/bold green] {report['report_json']}  {report['report_md']}")


@app.command()
def export(run_dir: Path = typer.Argument(..., help="run directory (or a checkpoint directory)"),
           out: Path = typer.Option(..., "--out", help="where to write the Hugging Face model dir"),
           step: Optional[int] = typer.Option(None, help="checkpoint step (default: the latest complete one)"),
           dtype: str = typer.Option("float32", help="float32 | bfloat16 | float16")) -> None:
    """Write a checkpoint (single-process or sharded) as a standard HF model dir that transformers/vLLM load."""
    from tepo_ray.trainer.checkpoint import export_model_dir, list_checkpoints, load_latest

    ckpt_root = run_dir / "checkpoints"
    cfg_file = run_dir / "config.yaml"
    if cfg_file.is_file():
        from omegaconf import OmegaConf

        custom = OmegaConf.select(OmegaConf.load(cfg_file), "trainer.checkpoint_dir")
        ckpt_root = Path(custom) if custom else ckpt_root
    if not ckpt_root.is_dir():
        ckpt_root = run_dir  # a checkpoint directory itself
    found = dict(list_checkpoints(ckpt_root))
    if step is None:
        latest = load_latest(ckpt_root)
        if latest is None:
            err_console.print(f"[red]error:[/red] no complete checkpoint under {ckpt_root}", highlight=False)
            raise typer.Exit(2)
        path = latest.path
    elif step in found:
        path = found[step]
    else:
        err_console.print(f"[red]error:[/red] no complete checkpoint step_{step} under {ckpt_root}; "
                          f"complete steps: {sorted(found)}", highlight=False)
        raise typer.Exit(2)
    try:
        written = export_model_dir(path, out, dtype=dtype)
    except (FileNotFoundError, ValueError) as exc:
        err_console.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(2) from None
    console.print(f"[bold green]exported[/bold green] {path} -> {written}")


@app.command()
def topology(config: Path = typer.Argument(...), overrides: List[str] = typer.Argument(None),
             address: Optional[str] = typer.Option(
                 None, help="also check against this running cluster: its GCS address HEAD:6379 or 'auto' "
                            "(the http:// dashboard address is for `submit`)")) -> None:
    """Print the placement-group bundles, resource needs and memory per device; refuse a plan that cannot fit."""
    from tepo_ray.topology import plan_topology

    cfg = _load(config, overrides or [])
    try:
        plan = plan_topology(cfg)
    except ConfigError as exc:
        err_console.print(f"[red]config error:[/red] {exc}", highlight=False)
        raise typer.Exit(2) from None
    console.print(plan.table(title=str(config)))
    pools = {k: cfg.tools[k] for k in ("python", "search")}
    for kind, t in pools.items():
        console.print(f"tool pool {kind}: workers={t.workers} (min {t.min_workers}, max {t.max_workers}, "
                      f"autoscale={t.autoscale})")
    console.print(f"needs {plan.total_cpus:g} CPUs and {plan.total_gpus:g} GPUs in one placement group")
    from tepo_ray.topology_memory import plan_memory

    try:
        memory = plan_memory(cfg)
        console.print(memory.table())
        memory.check()
    except ConfigError as exc:
        err_console.print(f"[red]config error:[/red] {exc}", highlight=False)
        raise typer.Exit(2) from None
    if address:
        _check_fits_cluster(cfg, address)


def _check_fits_cluster(cfg: Any, address: str) -> None:
    """Connect to a running cluster (starts none), compare its resources with the topology; exit 3 if short."""
    if address.startswith(("http://", "https://")):
        err_console.print(f"[red]--address {address}:[/red] `topology` connects with ray.init, which takes the "
                          f"cluster's GCS address (HEAD:6379) or 'auto'; the http:// dashboard address is for "
                          f"`submit`", highlight=False)
        raise typer.Exit(2)
    import ray

    from tepo_ray.config import validate_resources

    try:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    except Exception as exc:  # unreachable, bad address, authentication: one line, not a traceback
        err_console.print(f"[red]cannot connect to the Ray cluster at {address}:[/red] {type(exc).__name__}: {exc}",
                          highlight=False)
        raise typer.Exit(3) from None
    try:
        resources = ray.cluster_resources()
    finally:
        ray.shutdown()
    try:
        validate_resources(cfg, resources)
    except ConfigError as exc:
        err_console.print(f"[red]does not fit the cluster:[/red] {exc}", highlight=False)
        raise typer.Exit(3) from None
    console.print(f"[green]fits the cluster[/green] ({resources.get('CPU', 0):g} CPUs, "
                  f"{resources.get('GPU', 0):g} GPUs)")


# Config values that name files or directories. The job runs in a temporary copy of the project (Ray's
# working_dir, deleted by Ray later), so `submit` makes relative values absolute against the directory it
# runs in: what the user meant, and where the run's outputs outlive the job. On a cluster these absolute
# paths must exist on the nodes (a shared filesystem); `--no-resolve-paths` keeps them as written.
PATH_KEYS = ("model.cache_dir", "logging.run_dir", "trainer.checkpoint_dir", "data.train_path", "data.eval_path",
             "data.corpus_path", "data.sft_path", "tools.search.index_dir", "tools.search.embedding_model")
INPUT_PATH_KEYS = ("model.path", "data.train_path", "data.eval_path", "data.corpus_path", "data.sft_path",
                   "tools.search.embedding_model")


def resolve_job_paths(cfg: Any, *, base: Path) -> list[tuple[str, Optional[str], str]]:
    """Make the relative path values of `cfg` absolute against `base`, in place.

    Returns `(key, before, after)` for each change. A null `logging.run_dir`
    becomes `base/runs/<name>-<time>` (the driver's default, made absolute).
    `model.path` changes only when it names an existing local path; otherwise
    it is a hub id such as `Qwen/Qwen2.5-7B-Instruct`.
    """
    import os

    from omegaconf import OmegaConf

    from tepo_ray.driver import resolve_run_dir

    changes: list[tuple[str, Optional[str], str]] = []

    def put(key: str, value: str) -> None:
        changes.append((key, OmegaConf.select(cfg, key), value))
        OmegaConf.update(cfg, key, value, merge=False)

    if cfg.logging.run_dir is None:
        put("logging.run_dir", os.path.abspath(base / resolve_run_dir(cfg, None)))
    for key in PATH_KEYS:
        value = OmegaConf.select(cfg, key)
        if value is None:
            continue
        path = Path(value).expanduser()
        absolute = str(path) if path.is_absolute() else os.path.abspath(base / path)
        if absolute != value:
            put(key, absolute)
    model_path = cfg.model.path
    if model_path and model_path.startswith("~"):
        put("model.path", str(Path(model_path).expanduser()))
    elif model_path and not Path(model_path).is_absolute() and (base / model_path).exists():
        put("model.path", os.path.abspath(base / model_path))
    return changes


def _submit_hint(exc: Exception, address: str) -> str:
    """One line saying what to change after a refused submission (auth, address)."""
    from ray.exceptions import AuthenticationError

    # The address itself is left out of the match: a port such as 58401 is not an HTTP 401.
    text = str(exc).replace(address, " ").lower()
    if isinstance(exc, AuthenticationError) or re.search(
            r"\b(401|403|unauthori[sz]ed|unauthenticated|authentication|auth token|ray_auth_\w+)\b", text):
        return ("the cluster uses token authentication: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN=<the head's "
                "token> (or copy its ~/.ray/auth_token), as for `ray job submit`")
    return (f"--address {address} is not a reachable Ray dashboard: pass the head's dashboard URL, "
            f"e.g. --address http://HEAD:8265 (`ray start --head --dashboard-host=0.0.0.0` serves it; port 8265 "
            f"by default), or set RAY_ADDRESS")


@app.command()
def submit(config: Path = typer.Argument(...), overrides: List[str] = typer.Argument(None),
           address: str = typer.Option(..., help="Ray dashboard address, e.g. http://HEAD:8265"),
           follow: bool = typer.Option(True, help="follow the job's logs until it ends"),
           timeout: float = typer.Option(0, help="stop following after this many seconds (0 = never)"),
           resolve_paths: bool = typer.Option(
               True, "--resolve-paths/--no-resolve-paths",
               help="make relative path values (model.cache_dir, logging.run_dir, data.*_path, ...) absolute "
                    "against the current directory; the job itself runs in a temporary copy of the project")) -> None:
    """Submit a training job with the Ray Jobs API; the runtime_env carries the project and config.

    Exit codes: 0 job succeeded (or not followed / still running at --timeout), 1 job failed or was
    stopped, 2 bad config, 3 cluster unreachable or submission refused, 130 interrupted (the job goes on).
    On a token-authenticated cluster set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or ~/.ray/auth_token),
    as for `ray job submit`.
    """
    from omegaconf import OmegaConf
    from ray.exceptions import RayError
    from ray.job_submission import JobStatus, JobSubmissionClient

    from tepo_ray.config import to_yaml

    cfg = _load(config, overrides or [])
    if resolve_paths:
        base = Path.cwd()
        changes = resolve_job_paths(cfg, base=base)
        if changes:
            console.print(f"paths made absolute against {base} (--no-resolve-paths keeps them as written):",
                          highlight=False, soft_wrap=True)
            for key, before, after in changes:
                console.print(f"  {key}: {before} -> {after}", highlight=False, soft_wrap=True)
        for key in INPUT_PATH_KEYS:
            value = OmegaConf.select(cfg, key)
            if value and Path(value).is_absolute() and not Path(value).exists():
                err_console.print(f"[yellow]warning:[/yellow] {key}={value} does not exist on this machine; "
                                  f"the job will look for it on the cluster", highlight=False)

    stage = Path(tempfile.mkdtemp(prefix="tepo-submit-"))
    try:
        for pkg in ("tepo_ray", "actors", "experiments"):
            if (REPO_ROOT / pkg).is_dir():  # experiments/ is absent from a non-editable install
                shutil.copytree(REPO_ROOT / pkg, stage / pkg,
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        (stage / "job_config.yaml").write_text(to_yaml(cfg))
        try:
            client = JobSubmissionClient(address)
            job_id = client.submit_job(  # uploads the working_dir before returning
                entrypoint="python -m tepo_ray.cli train job_config.yaml",
                runtime_env={"working_dir": str(stage), "env_vars": {"PYTHONUNBUFFERED": "1"}},
                metadata={"tepo_ray": "train", "config": str(config)},
            )
        except (ConnectionError, RuntimeError, ValueError, RayError) as exc:
            err_console.print(f"[red]cannot submit to {address}:[/red] {type(exc).__name__}: {exc}\n"
                              f"[bold]what to set:[/bold] {_submit_hint(exc, address)}", highlight=False)
            raise typer.Exit(3) from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    console.print(f"[bold]submitted job[/bold] {job_id}", highlight=False)
    console.print(f"run directory (on the cluster): {cfg.logging.run_dir or 'runs/ inside the job working_dir'}",
                  highlight=False, soft_wrap=True)
    if not follow:
        console.print(f"follow it with: ray job logs -f {job_id} --address {address}", highlight=False)
        return
    try:
        status = _follow_job(client, job_id, timeout=timeout)
    except KeyboardInterrupt:
        err_console.print(f"stopped following; job {job_id} keeps running "
                          f"(stop it with: ray job stop {job_id} --address {address})", highlight=False)
        raise typer.Exit(130) from None
    if status is None:
        console.print(f"[yellow]job {job_id} still running after {timeout:g}s; stopped following[/yellow] "
                      f"(ray job logs -f {job_id} --address {address})", highlight=False)
        return
    console.print(f"job {job_id}: [bold]{status.value}[/bold]", highlight=False)
    if status != JobStatus.SUCCEEDED:
        message = client.get_job_info(job_id).message
        if message:
            err_console.print(f"[red]{message.strip().splitlines()[0]}[/red]", highlight=False)
        raise typer.Exit(1)


def _follow_job(client: Any, job_id: str, *, timeout: float) -> Any:
    """Print the job's logs once each, as they come, until it ends; its final `JobStatus`, or None at `timeout`.

    Streams with the Jobs API websocket tail (what `ray job submit` does); if the
    stream drops, polls the log and prints only what is new.
    """
    import asyncio

    logging.getLogger("ray.dashboard.modules.job.sdk").setLevel(logging.WARNING)  # "WebSocket closed ..." noise
    deadline = time.monotonic() + timeout if timeout > 0 else None
    printed = 0

    def emit(text: str) -> None:
        nonlocal printed
        sys.stdout.write(text)
        sys.stdout.flush()
        printed += len(text)

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            emit(chunk)

    try:
        asyncio.run(asyncio.wait_for(tail(), timeout=timeout if timeout > 0 else None))
    except asyncio.TimeoutError:
        return None
    except (RuntimeError, OSError) as exc:  # the websocket dropped: poll from what was printed
        err_console.print(f"[yellow]log stream interrupted ({exc}); polling the job's log[/yellow]",
                          highlight=False)
        while True:
            status = client.get_job_status(job_id)
            logs = client.get_job_logs(job_id)
            if len(logs) > printed:
                emit(logs[printed:])
            if status.is_terminal():
                return status
            if deadline is not None and time.monotonic() > deadline:
                return None
            time.sleep(1.0)
    while True:  # the stream ends with the job; its status can lag a moment behind
        status = client.get_job_status(job_id)
        if status.is_terminal():
            return status
        if deadline is not None and time.monotonic() > deadline:
            return None
        time.sleep(0.5)


@app.command()
def compare(run_dirs: List[Path] = typer.Argument(..., help="run directories to overlay"),
            out: Path = typer.Option(Path("compare.png"), help="output PNG")) -> None:
    """Overlay learning curves and ΔH distributions of several runs (e.g. grpo vs sparse vs dense)."""
    from tepo_ray.metrics import plot_run

    missing = [d for d in run_dirs if not (d / "metrics.jsonl").exists()]
    if missing:
        console.print(f"[red]no metrics.jsonl in: {', '.join(map(str, missing))}[/red]")
        raise typer.Exit(2)
    path = plot_run({d.name: d for d in run_dirs}, out)
    console.print(f"wrote {path}")


@app.command()
def pilot(config: Path = typer.Argument(..., help="YAML config (e.g. experiments/configs/pilot.yaml)"),
          overrides: List[str] = typer.Argument(None, help="dotlist overrides, e.g. pilot.judge=llm"),
          out: Path = typer.Option(Path("runs/pilot"), help="output directory (pilot.json, pilot.md, pilot.png)"),
          model: Optional[str] = typer.Option(None, help="policy model dir (default: the config's SFT checkpoint)"),
          weights: Optional[Path] = typer.Option(None, help="a run's weights/vN.safetensors loaded over the model")
          ) -> None:
    """Pilot study: ΔH of useful vs useless tool calls on held-out items (judge, CI, Mann–Whitney U, plot)."""
    from tepo_ray.pilot import run_pilot

    cfg = _load(config, overrides or [])
    if weights is not None and not weights.is_file():
        err_console.print(f"[red]--weights {weights}: no such file[/red]", highlight=False)
        raise typer.Exit(2)
    result = run_pilot(cfg, out_dir=out, model_path=model, weights=str(weights) if weights else None,
                       progress=cfg.logging.progress)
    console.print((out / "pilot.md").read_text(), highlight=False, markup=False)
    console.print(f"[bold green]pilot:[/bold green] {out / 'pilot.json'}  {result['plot']}", highlight=False)


@app.command()
def sweep(config: Path = typer.Argument(..., help="YAML config (e.g. experiments/configs/compare.yaml)"),
          overrides: List[str] = typer.Argument(None, help="dotlist overrides, e.g. sweep.seeds=[0,1] trainer.steps=8"),
          out: Optional[Path] = typer.Option(None, help="sweep directory (default runs/sweep-<time>)"),
          address: Optional[str] = typer.Option(None, help="Ray cluster address (else RAY_ADDRESS or a local one)")
          ) -> None:
    """Train GRPO, TEPO-sparse and TEPO-dense (per alpha) from one SFT checkpoint over seeds; evaluate; report."""
    from tepo_ray.sweep import run_sweep

    cfg = _load(config, overrides or [])
    out = out or Path("runs") / f"sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    result = run_sweep(cfg, out_dir=out, address=address, progress=cfg.logging.progress)
    console.print(Path(result["report"]).read_text(), highlight=False, markup=False)
    console.print(f"[bold green]report:[/bold green] {result['report']}", highlight=False)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
