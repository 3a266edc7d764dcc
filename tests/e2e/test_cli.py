"""The `tepo-ray` command line as users run it: the installed console script in a subprocess.

Fast (no Ray cluster is started here): `topology` tables checked against numbers
computed from the YAML files themselves, config errors, `--help`, `index build`
on a missing corpus, `submit` failing before and at the cluster, and the path
resolution `submit` applies before it ships a config.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tepo_ray.config import load_config

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "experiments" / "configs"
DEMO = CONFIGS / "demo.yaml"
BIG = CONFIGS / "qwen2.5-7b_dense_8gpu.yaml"
TEPO_RAY = Path(sys.executable).parent / "tepo-ray"
ROLE_ORDER = ("generators", "scorers", "learner", "python_tools", "search_tools")  # bundle order (topology.py)

# Runs the CLI in a fresh interpreter and reports afterwards whether Ray was even imported.
PROBE = """
import sys
from tepo_ray.cli import app
code = 0
try:
    app(sys.argv[1:], prog_name="tepo-ray")
except SystemExit as exc:
    code = exc.code or 0
print(f"RAY_IMPORTED={'ray' in sys.modules}", file=sys.stderr)
sys.exit(code)
"""


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env["COLUMNS"] = "200"  # rich wraps at 80 columns without a terminal
    return env


def tepo_ray(*args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """The installed console script, exactly as a user runs it."""
    return subprocess.run([str(TEPO_RAY), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          cwd=cwd or REPO, env=_env())


def probe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROBE, *map(str, args)], capture_output=True, text=True,
                          timeout=120, cwd=REPO, env=_env())


def _table_rows(out: str) -> list[list[str]]:
    """Body rows of the rich table: cells between the box-drawing bars."""
    rows = []
    for line in out.splitlines():
        if line.startswith("│"):
            rows.append([c.strip() for c in line.strip().strip("│").split("│")])
    return rows


def _expected_topology(path: Path, *, overrides: dict[str, dict[str, float]] | None = None):
    """Bundles and totals straight from the YAML (not through tepo_ray): [(role, replica, cpu, gpu)], cpus, gpus."""
    raw = yaml.safe_load(path.read_text())
    topo = raw["topology"]
    for role, values in (overrides or {}).items():
        topo[role] = {**topo[role], **values}
    data = raw.get("data", {})
    if raw["tools"]["search"]["workers"] == 0 or (
            data.get("task") not in ("multihop", "mixed") and not data.get("corpus_path")):
        topo["search_tools"] = {**topo["search_tools"], "replicas": 0}  # no search pool -> no bundle
    if raw["tools"]["python"]["workers"] == 0:
        topo["python_tools"] = {**topo["python_tools"], "replicas": 0}
    bundles = [(role, i, float(topo[role]["num_cpus"]), float(topo[role]["num_gpus"]))
               for role in ROLE_ORDER for i in range(int(topo[role]["replicas"]))]
    return bundles, sum(b[2] for b in bundles), sum(b[3] for b in bundles)


def _check_topology_output(out: str, path: Path, *, overrides: dict[str, dict[str, float]] | None = None) -> None:
    bundles, cpus, gpus = _expected_topology(path, overrides=overrides)
    rows = _table_rows(out)
    assert rows, out
    rows = rows[: next((i + 1 for i, r in enumerate(rows) if r[0] == "total"), len(rows))]  # the bundle table
    body, total = rows[:-1], rows[-1]
    got = [(r[1], int(r[2]), float(r[3]), float(r[4])) for r in body]
    assert got == bundles, out
    assert [int(r[0]) for r in body] == list(range(len(bundles))), "bundle indices are not 0..n-1 in order"
    assert total[0] == "total" and float(total[3]) == pytest.approx(cpus) and float(total[4]) == pytest.approx(gpus)
    assert f"needs {cpus:g} CPUs and {gpus:g} GPUs in one placement group" in out
    tools = yaml.safe_load(path.read_text())["tools"]
    for kind in ("python", "search"):
        t = tools[kind]
        assert (f"tool pool {kind}: workers={t['workers']} (min {t['min_workers']}, max {t['max_workers']}, "
                f"autoscale={t.get('autoscale', False)})") in out


def test_topology_paper_config_with_the_console_script():
    res = tepo_ray("topology", BIG)
    assert res.returncode == 0, res.stderr
    _check_topology_output(res.stdout, BIG)
    gens = [r for r in _table_rows(res.stdout) if r[1] == "generators"]
    assert len(gens) == 4 and all(r[4] == "1" for r in gens), res.stdout  # the 8-GPU layout: 4 x 1-GPU vLLM
    assert "needs 52 CPUs and 8 GPUs" in res.stdout


def test_topology_demo_config_imports_no_ray():
    res = probe("topology", DEMO)
    assert res.returncode == 0, res.stderr
    _check_topology_output(res.stdout, DEMO)
    assert "RAY_IMPORTED=False" in res.stderr, "topology without --address must not even import Ray"


def test_topology_overrides_change_the_bundles():
    res = probe("topology", DEMO, "topology.generators.replicas=3", "topology.learner.num_gpus=1")
    assert res.returncode == 0, res.stderr
    _check_topology_output(res.stdout, DEMO,
                           overrides={"generators": {"replicas": 3}, "learner": {"num_gpus": 1}})
    assert "RAY_IMPORTED=False" in res.stderr


@pytest.mark.parametrize(
    ("override", "must_name"),
    [("algo.alpah=1", ["algo.alpah", "algo.alpha"]),  # unknown key: named, with the closest valid one
     ("algo.alpha=-1", ["algo.alpha", ">= 0"]),  # out of range: the key and what is allowed
     ("topology.learner.replicas=0", ["topology.learner.replicas", ">= 1"]),  # plan check, not a schema check
     ("engine.name=sglang", ["engine.name", "hf", "vllm"])],
    ids=["unknown-key", "out-of-range", "no-learner", "bad-enum"],
)
def test_bad_override_exits_2_naming_the_key(override, must_name):
    res = tepo_ray("topology", DEMO, override)
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert "config error" in res.stderr
    for text in must_name:
        assert text in res.stderr, res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    assert "bundle" not in res.stdout  # nothing printed as if it had worked


def test_missing_config_file_exits_2_naming_it(tmp_path):
    missing = tmp_path / "nope.yaml"
    res = tepo_ray("topology", missing)
    assert res.returncode == 2
    assert str(missing) in res.stderr and "does not exist" in res.stderr


def test_help_lists_every_command():
    res = tepo_ray("--help")
    assert res.returncode == 0, res.stderr
    listed = set(re.findall(r"^│ (\w+)\s", res.stdout, flags=re.M))
    assert {"train", "demo", "sft", "eval", "topology", "submit", "compare", "index"} <= listed, res.stdout
    sub = tepo_ray("submit", "--help")
    assert sub.returncode == 0 and "--address" in sub.stdout and "--resolve-paths" in sub.stdout


def test_index_build_on_a_missing_corpus_fails_clearly(tmp_path):
    corpus = tmp_path / "no_such_corpus.jsonl"
    out = tmp_path / "index"
    res = tepo_ray("index", "build", corpus, "--out", out)
    assert res.returncode != 0
    assert str(corpus) in res.stderr and "not found" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    assert not out.exists(), "a failed build left an index directory behind"


@pytest.mark.parametrize("key", ["data.train_path", "data.eval_path"])
def test_train_on_a_missing_data_file_exits_2_naming_the_key(tmp_path, key):
    """Before any actor or Ray starts: one line naming the config key, the file and what to set."""
    missing = tmp_path / "no_such.jsonl"
    good = tmp_path / "train.jsonl"
    good.write_text('{"question": "1+1?", "answers": ["2"]}\n')
    paths = {"data.train_path": good, "data.eval_path": good, key: missing}
    res = tepo_ray("train", DEMO, "data.task=jsonl", *(f"{k}={v}" for k, v in paths.items()),
                   f"logging.run_dir={tmp_path / 'run'}", "model.cache_dir=" + str(tmp_path / "cache"))
    assert res.returncode == 2, (res.stdout, res.stderr)
    err = " ".join(res.stderr.split())
    assert f"data error: {key}: {missing}: data file not found" in err, err
    assert f"set {key} to a readable" in err and "Traceback" not in res.stderr


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_submit_to_an_unreachable_dashboard_exits_3_naming_it():
    address = f"http://127.0.0.1:{_closed_port()}"
    res = tepo_ray("submit", DEMO, "--address", address, timeout=60)
    assert res.returncode == 3, (res.stdout, res.stderr)
    assert f"cannot submit to {address}" in res.stderr and "Traceback" not in res.stderr
    assert "what to set:" in res.stderr and "--address http://HEAD:8265" in res.stderr


def test_submit_checks_the_config_before_contacting_the_cluster():
    res = tepo_ray("submit", DEMO, "algo.alpha=-1", "--address", f"http://127.0.0.1:{_closed_port()}")
    assert res.returncode == 2 and "algo.alpha" in res.stderr


def test_topology_address_must_be_the_gcs_address():
    res = tepo_ray("topology", DEMO, "--address", "http://127.0.0.1:8265")
    assert res.returncode == 2 and "GCS address" in res.stderr


# --------------------------------------------------------------------------- submit's path resolution
def test_resolve_job_paths_makes_relative_paths_absolute(tmp_path):
    from tepo_ray.cli import resolve_job_paths

    (tmp_path / "data").mkdir()
    cfg = load_config([BIG], ["model.cache_dir=cache", "logging.run_dir=null", "tools.search.index_dir=~/idx",
                              f"trainer.checkpoint_dir={tmp_path / 'ck'}"])
    changes = {k: (before, after) for k, before, after in resolve_job_paths(cfg, base=tmp_path)}
    assert cfg.model.cache_dir == str(tmp_path / "cache")
    assert cfg.data.train_path == str(tmp_path / "data" / "train.jsonl")  # from the YAML: data/train.jsonl
    assert cfg.data.corpus_path == str(tmp_path / "data" / "wiki-18.jsonl")
    assert cfg.tools.search.index_dir == str(Path("~/idx").expanduser())
    run_dir = Path(cfg.logging.run_dir)  # null: the driver's runs/<name>-<time>, under base
    assert run_dir.parent == tmp_path / "runs" and run_dir.name.startswith("qwen2.5-7b-dense-")
    assert cfg.trainer.checkpoint_dir == str(tmp_path / "ck") and "trainer.checkpoint_dir" not in changes
    assert cfg.model.path == "Qwen/Qwen2.5-7B-Instruct" and "model.path" not in changes  # a hub id, no local dir
    assert changes["model.cache_dir"] == ("cache", str(tmp_path / "cache"))
    assert changes["logging.run_dir"][0] is None


def test_resolve_job_paths_resolves_a_local_model_dir(tmp_path):
    from tepo_ray.cli import resolve_job_paths

    (tmp_path / "ckpt" / "sft").mkdir(parents=True)
    cfg = load_config([DEMO], ["model.path=ckpt/sft", f"logging.run_dir={tmp_path / 'r'}",
                               f"model.cache_dir={tmp_path / 'c'}"])
    changes = resolve_job_paths(cfg, base=tmp_path)
    assert cfg.model.path == str(tmp_path / "ckpt" / "sft")
    assert [k for k, _, _ in changes] == ["model.path"]  # absolute values are left alone


def test_submit_hint_names_the_token_settings_on_an_auth_refusal():
    from tepo_ray.cli import _submit_hint

    hint = _submit_hint(RuntimeError("Request failed with status code 401: Unauthorized"), "http://h:8265")
    assert "RAY_AUTH_MODE=token" in hint and "RAY_AUTH_TOKEN" in hint
    assert "--address" in _submit_hint(ConnectionError("Failed to connect to Ray at address: http://h:1"), "x")
    # A port that contains 401/403 is an address problem, not an auth refusal (this once picked the wrong hint).
    for address in ("http://127.0.0.1:58401", "http://10.0.0.1:14030"):
        hint = _submit_hint(ConnectionError(f"Failed to connect to Ray at address: {address}."), address)
        assert "--address http://HEAD:8265" in hint and "RAY_AUTH" not in hint, (address, hint)
