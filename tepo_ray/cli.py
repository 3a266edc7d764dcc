"""`tepo-ray` command line (typer).

    tepo-ray demo                                  # embedded defaults end to end (what `make demo` runs)
    tepo-ray train CONFIG [key=value ...] [--address ADDR] [--resume RUN_DIR]
    tepo-ray sft CONFIG [key=value ...]            # SFT warm start; prints the checkpoint dir
    tepo-ray eval CONFIG [key=value ...] [--model PATH]
    tepo-ray submit CONFIG [key=value ...] --address http://HEAD:8265
    tepo-ray topology CONFIG [key=value ...]       # bundles and resource needs; starts nothing
    tepo-ray index build CORPUS.jsonl --out DIR [--backend bm25|chroma]
    tepo-ray compare RUN_DIR [RUN_DIR ...] --out plot.png
"""

from __future__ import annotations

import json
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

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO_ROOT / "experiments" / "configs" / "demo.yaml"

try:
    from tepo_ray.tools.retrieval.cli import index_app

    app.add_typer(index_app, name="index", help="Build and query search indexes.")
except ImportError:  # pragma: no cover - retrieval extras missing
    pass


def _load(config: Optional[Path], overrides: List[str]) -> Any:
    try:
        return load_config([config] if config else [], overrides)
    except ConfigError as exc:
        console.print(f"[red]config error:[/red] {exc}")
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
    cfg = _load(config, overrides or [])
    if resume is not None and (resume / "config.yaml").exists() and not overrides:
        cfg = _load(resume / "config.yaml", [])
    summary = run_train(cfg, resume=str(resume) if resume else None, address=address)
    _print_summary(summary)


@app.command()
def demo(overrides: List[str] = typer.Argument(None, help="dotlist overrides on demo.yaml")) -> None:
    """Embedded defaults end to end: tiny model, SFT warm start, TEPO-dense on a local Ray."""
    from tepo_ray.driver import train as run_train

    cfg = _load(DEMO_CONFIG if DEMO_CONFIG.exists() else None, overrides or [])
    summary = run_train(cfg)
    _print_summary(summary)


@app.command()
def sft(config: Path = typer.Argument(...), overrides: List[str] = typer.Argument(None)) -> None:
    """SFT warm start on tool-use demonstrations (observations masked)."""
    from tepo_ray.data.world import prepare_data

    cfg = _load(config, overrides or [])
    data = prepare_data(cfg, progress=cfg.logging.progress)
    console.print(f"[bold green]SFT checkpoint:[/bold green] {data.model_path}")


@app.command("eval")
def eval_cmd(config: Path = typer.Argument(...), overrides: List[str] = typer.Argument(None),
             model: Optional[str] = typer.Option(None, help="model dir (default: the config's, after SFT)"),
             address: Optional[str] = typer.Option(None)) -> None:
    """Greedy evaluation on the held-out split with real tools."""
    from tepo_ray.evaluate import evaluate

    cfg = _load(config, overrides or [])
    result = evaluate(cfg, model_path=model, address=address)
    console.print_json(json.dumps(result))


@app.command()
def topology(config: Path = typer.Argument(...), overrides: List[str] = typer.Argument(None),
             address: Optional[str] = typer.Option(None, help="also check against this running cluster")) -> None:
    """Print the placement-group bundles and resource needs without starting anything."""
    from tepo_ray.topology import plan_topology

    cfg = _load(config, overrides or [])
    try:
        plan = plan_topology(cfg)
    except ConfigError as exc:
        console.print(f"[red]config error:[/red] {exc}")
        raise typer.Exit(2) from None
    console.print(plan.table(title=str(config)))
    pools = {k: cfg.tools[k] for k in ("python", "search")}
    for kind, t in pools.items():
        console.print(f"tool pool {kind}: workers={t.workers} (min {t.min_workers}, max {t.max_workers}, "
                      f"autoscale={t.autoscale})")
    console.print(f"needs {plan.total_cpus:g} CPUs and {plan.total_gpus:g} GPUs in one placement group")
    if address:
        import ray

        from tepo_ray.config import validate_resources

        ray.init(address=address)
        try:
            validate_resources(cfg, ray.cluster_resources())
        except ConfigError as exc:
            console.print(f"[red]does not fit the cluster:[/red] {exc}")
            raise typer.Exit(3) from None
        console.print("[green]fits the cluster[/green]")


@app.command()
def submit(config: Path = typer.Argument(...), overrides: List[str] = typer.Argument(None),
           address: str = typer.Option(..., help="Ray dashboard address, e.g. http://HEAD:8265"),
           follow: bool = typer.Option(True, help="follow the job's logs until it ends"),
           timeout: float = typer.Option(0, help="stop following after this many seconds (0 = never)")) -> None:
    """Submit a training job with the Ray Jobs API; the runtime_env carries the project and config."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    cfg = _load(config, overrides or [])
    from tepo_ray.config import to_yaml

    stage = Path(tempfile.mkdtemp(prefix="tepo-submit-"))
    try:
        for pkg in ("tepo_ray", "actors", "experiments"):
            shutil.copytree(REPO_ROOT / pkg, stage / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        (stage / "job_config.yaml").write_text(to_yaml(cfg))
        client = JobSubmissionClient(address)
        job_id = client.submit_job(
            entrypoint="python -m tepo_ray.cli train job_config.yaml",
            runtime_env={"working_dir": str(stage), "env_vars": {"PYTHONUNBUFFERED": "1"}},
            metadata={"tepo_ray": "train", "config": str(config)},
        )
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    console.print(f"[bold]submitted job[/bold] {job_id}")
    if not follow:
        return
    shown = 0
    t0 = time.time()
    terminal = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
    while True:
        status = client.get_job_status(job_id)
        logs = client.get_job_logs(job_id)
        if len(logs) > shown:
            sys.stdout.write(logs[shown:])
            sys.stdout.flush()
            shown = len(logs)
        if status in terminal:
            break
        if timeout and time.time() - t0 > timeout:
            console.print(f"[yellow]still {status} after {timeout:.0f}s; stopped following[/yellow]")
            return
        time.sleep(1.0)
    console.print(f"job {job_id}: [bold]{status}[/bold]")
    if status != JobStatus.SUCCEEDED:
        raise typer.Exit(1)


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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
