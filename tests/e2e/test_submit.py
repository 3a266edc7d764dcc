"""`tepo-ray submit` against a real Ray cluster started with `ray start --head` (Jobs API, dashboard).

The cluster is private to this module: free ports, its own short `--temp-dir`
(Ray's socket paths must stay under ~107 characters), 2 CPUs. It never touches a
Ray instance the test session may have started in-process (`ray.init` in other
fixtures): the CLI runs in a subprocess and reaches the cluster only through the
dashboard address, and the job's own `ray.init()` gets the cluster from the
`RAY_ADDRESS` the job system sets. Teardown does not use `ray stop` (which kills
every Ray process on the machine): it ends the `ray start --block` process group
and then only processes whose command line or working directory lies under this
cluster's temp dir.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
import yaml

from tepo_ray.metrics import K, read_metrics

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "experiments" / "configs" / "demo.yaml"
BIG = REPO / "experiments" / "configs" / "qwen2.5-7b_dense_8gpu.yaml"
BIN = Path(sys.executable).parent
TEPO_RAY = BIN / "tepo-ray"
RAY = BIN / "ray"

pytestmark = pytest.mark.ray

# A tiny, random-init run: this test is about the submission path, not learning.
STEPS = 2
TINY_JOB = [
    "model.hidden_size=128",
    "model.num_heads=2",
    "model.num_kv_heads=1",
    "model.num_layers=2",
    "model.intermediate_size=256",
    "model.vocab_size=384",
    "data.num_train=64",
    "data.num_eval=4",
    "trainer.sft_steps=0",
    f"trainer.steps={STEPS}",
    "trainer.checkpoint_interval=0",
    "async.rollout_batch_groups=1",
    "algo.group_size=2",
    "engine.name=hf",
    "engine.max_new_tokens=32",
    "engine.max_turn_tokens=16",
    "logging.wandb_mode=disabled",
    "logging.progress=false",
]


def _free_ports(n: int) -> list[int]:
    """`n` distinct ports the OS reports free right now (bound to port 0, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _env(token: str | None) -> dict[str, str]:
    """The venv's bin first on PATH (the job's `python` is the venv's), no inherited Ray address.

    With `token`, token authentication on (Ray's default for new clusters) with this cluster's own token
    in the environment: ~/.ray/auth_token is neither read nor written. Without it, auth mode is left
    unset and no token is passed (a client that forgot the token).
    """
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    for key in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(key, None)
    if token is not None:
        env["RAY_AUTH_MODE"] = "token"
        env["RAY_AUTH_TOKEN"] = token
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["PYTHONUNBUFFERED"] = "1"
    env["COLUMNS"] = "200"  # rich wraps at 80 columns without a terminal
    return env


@dataclass
class Cluster:
    gcs_address: str  # 127.0.0.1:PORT, what ray.init / RAY_ADDRESS take
    dashboard: str  # http://127.0.0.1:PORT, what the Jobs API takes
    temp_dir: Path
    token: str
    proc: subprocess.Popen
    log: Path

    def client(self):
        from ray.job_submission import JobSubmissionClient

        # An explicit header: this test process's own Ray auth mode (other fixtures' ray.init) is not touched.
        return JobSubmissionClient(self.dashboard, headers={"Authorization": f"Bearer {self.token}"})


def _processes_under(temp_dir: Path) -> list:
    """Processes whose command line or cwd names this cluster's temp dir (ours alone: the name is unique)."""
    import psutil

    key = str(temp_dir)
    out = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        if p.pid == os.getpid():
            continue
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            if key in cmd or p.cwd().startswith(key):
                out.append(p)
        except (psutil.Error, OSError):
            continue
    return out


def _stop_cluster(cluster: Cluster) -> None:
    """End what `ray start` started, by process id: its process group, then stragglers under temp_dir."""
    import psutil

    try:
        os.killpg(cluster.proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        cluster.proc.wait(timeout=5)  # some Ray daemons linger on SIGTERM for 15 s or more: don't wait for them
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(cluster.proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    cluster.proc.wait(timeout=10)
    for attempt in range(2):  # what left the group (job drivers run in their own session) but runs under temp_dir
        procs = _processes_under(cluster.temp_dir)
        if not procs:
            break
        for p in procs:
            try:
                p.terminate() if attempt == 0 else p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(procs, timeout=5)
    shutil.rmtree(cluster.temp_dir, ignore_errors=True)


def _start_cluster(log_dir: Path) -> Cluster:
    temp_dir = Path("/tmp") / f"tr-{uuid.uuid4().hex[:8]}"  # short: Ray socket paths are length-limited
    (gcs, dash, client, nm, om, agent_listen, agent_grpc, metrics, rt_env) = _free_ports(9)
    log = log_dir / "ray-start.log"
    token = secrets.token_hex(32)
    cmd = [
        str(RAY), "start", "--head", "--block",
        "--node-ip-address=127.0.0.1",
        f"--port={gcs}",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
        f"--ray-client-server-port={client}",
        f"--node-manager-port={nm}",
        f"--object-manager-port={om}",
        f"--dashboard-agent-listen-port={agent_listen}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--metrics-export-port={metrics}",
        f"--runtime-env-agent-port={rt_env}",
        "--min-worker-port=0", "--max-worker-port=0",  # workers take OS-assigned ports
        "--num-cpus=2", "--num-gpus=0",
        f"--object-store-memory={300 * 2**20}",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=_env(token), cwd=log_dir,
                                start_new_session=True)
    cluster = Cluster(f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dash}", temp_dir, token, proc, log)
    try:
        _wait_for_jobs_api(cluster, timeout=120)
    except BaseException:
        _stop_cluster(cluster)
        raise
    return cluster


def _wait_for_jobs_api(cluster: Cluster, *, timeout: float) -> None:
    """Until the dashboard answers job listings (the head and its agent are up)."""
    from ray.exceptions import AuthenticationError

    t0 = time.time()
    last: Exception | None = None
    while time.time() - t0 < timeout:
        if cluster.proc.poll() is not None:
            raise RuntimeError(f"`ray start` exited with {cluster.proc.returncode}:\n{cluster.log.read_text()[-3000:]}")
        try:
            cluster.client().list_jobs()
            return
        except AuthenticationError:
            raise
        except Exception as exc:  # not up yet
            last = exc
            time.sleep(1.0)
    raise TimeoutError(f"Jobs API at {cluster.dashboard} not up in {timeout}s ({last!r}):\n"
                       f"{cluster.log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = _start_cluster(tmp_path_factory.mktemp("ray_head"))
    try:
        yield c
    finally:
        _stop_cluster(c)


def _run(args: list[str], *, cwd: Path, timeout: float, token: str | None) -> subprocess.CompletedProcess:
    return subprocess.run([str(TEPO_RAY), *args], cwd=cwd, env=_env(token), capture_output=True, text=True,
                          timeout=timeout)


def _job_id(out: str) -> str:
    m = re.search(r"submitted job (\S+)", out)
    assert m, out
    return m.group(1)


def test_submit_runs_a_training_job_on_the_cluster(cluster: Cluster, e2e_cache: Path, tmp_path: Path):
    """A real job: working_dir upload, `python -m tepo_ray.cli train` on the cluster, logs followed once each."""
    from ray.job_submission import JobStatus

    # logging.run_dir is relative on purpose: `submit` must resolve it against its own cwd, not the job's
    # temporary working_dir (where the run would vanish).
    t0 = time.time()
    res = _run(["submit", str(DEMO), f"model.cache_dir={e2e_cache}", "logging.run_dir=run", *TINY_JOB,
                "--address", cluster.dashboard], cwd=tmp_path, timeout=540, token=cluster.token)
    wall = time.time() - t0
    out = res.stdout + res.stderr
    print(f"submit wall time {wall:.1f}s")
    assert res.returncode == 0, out[-6000:]
    job_id = _job_id(res.stdout)
    run_dir = tmp_path / "run"
    assert f"logging.run_dir: run -> {run_dir}" in res.stdout
    assert f"job {job_id}: SUCCEEDED" in res.stdout

    client = cluster.client()
    info = client.get_job_info(job_id)
    assert info.status == JobStatus.SUCCEEDED
    assert info.entrypoint == "python -m tepo_ray.cli train job_config.yaml"
    assert info.metadata["tepo_ray"] == "train"

    # The job trained with exactly the submitted config (the job's copy, not this checkout's defaults).
    recs = read_metrics(run_dir / "metrics.jsonl")
    assert [r[K.STEP] for r in recs] == list(range(1, STEPS + 1))
    assert [r[K.VERSION] for r in recs] == list(range(1, STEPS + 1))
    for r in recs:
        for key in (K.REWARD, K.SCORE, K.CALLS, K.STALENESS_MAX, K.GEN_TOKENS_PER_S, K.ITEMS, "learner/loss"):
            assert key in r, key
        assert len(r[K.ITEMS]) == 1  # async.rollout_batch_groups=1
        assert r["learner/tokens_trained"] > 0
    job_cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert job_cfg["model"]["hidden_size"] == 128 and job_cfg["trainer"]["steps"] == STEPS
    assert job_cfg["model"]["cache_dir"] == str(e2e_cache) and job_cfg["logging"]["run_dir"] == str(run_dir)
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == STEPS

    # What the job ran from: Ray's unpacked working_dir holds the project copy and the resolved config.
    shipped = [p.parent for p in cluster.temp_dir.rglob("job_config.yaml")
               if yaml.safe_load(p.read_text()) == job_cfg]
    assert len(shipped) == 1, list(cluster.temp_dir.rglob("job_config.yaml"))
    wd = shipped[0]
    assert {"tepo_ray", "actors", "experiments"} <= {p.name for p in wd.iterdir() if p.is_dir()}
    assert (wd / "tepo_ray" / "cli.py").read_text() == (REPO / "tepo_ray" / "cli.py").read_text()

    # Logs were followed, each line printed once (not the whole log again on every poll).
    logs = client.get_job_logs(job_id)
    assert "Running entrypoint for job" in logs
    assert res.stdout.count("Running entrypoint for job") == 1
    assert res.stdout.count("metrics file:") == 1
    lines = [ln for ln in logs.splitlines() if ln.strip()]
    missing = [ln for ln in lines if ln not in res.stdout]
    assert not missing, missing[:5]


def test_submit_reports_a_failed_job(cluster: Cluster, e2e_cache: Path, tmp_path: Path):
    """A job that fails on the cluster: exit 1, FAILED printed, the job's error in the followed log."""
    missing = tmp_path / "no_such_train.jsonl"
    res = _run(["submit", str(DEMO), f"model.cache_dir={e2e_cache}", f"logging.run_dir={tmp_path / 'run'}",
                *TINY_JOB, "data.task=jsonl", f"data.train_path={missing}", "--address", cluster.dashboard],
               cwd=tmp_path, timeout=300, token=cluster.token)
    out = res.stdout + res.stderr
    assert res.returncode == 1, out[-4000:]
    assert f"data.train_path={missing} does not exist on this machine" in res.stderr
    job_id = _job_id(res.stdout)
    assert f"job {job_id}: FAILED" in res.stdout
    assert str(missing) in res.stdout, "the job's own error did not reach the user"
    assert "set data.train_path to a readable" in " ".join(res.stdout.split())  # ... saying what to set


def test_submit_without_the_cluster_token_is_refused_clearly(cluster: Cluster, tmp_path: Path):
    res = _run(["submit", str(DEMO), "--address", cluster.dashboard], cwd=tmp_path, timeout=120, token=None)
    assert res.returncode == 3, res.stdout + res.stderr
    assert f"cannot submit to {cluster.dashboard}" in res.stderr
    assert "Authentication" in res.stderr and "RAY_AUTH_TOKEN" in res.stderr
    assert "what to set:" in res.stderr and "RAY_AUTH_MODE=token" in res.stderr  # the fix, not just the error
    assert "Traceback" not in res.stderr


def test_topology_checks_a_live_cluster(cluster: Cluster, tmp_path: Path):
    fits = _run(["topology", str(DEMO), "--address", cluster.gcs_address], cwd=tmp_path, timeout=120,
                token=cluster.token)
    assert fits.returncode == 0, fits.stdout + fits.stderr
    assert "fits the cluster (2 CPUs, 0 GPUs)" in fits.stdout
    big = _run(["topology", str(BIG), "--address", cluster.gcs_address], cwd=tmp_path, timeout=120,
               token=cluster.token)
    assert big.returncode == 3, big.stdout + big.stderr
    assert "does not fit the cluster" in big.stderr and "needs 52 CPUs but the cluster has 2" in big.stderr
