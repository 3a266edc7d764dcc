"""The sandbox on a host that is NOT root (typical on shared clusters): no uid drop and no namespaces, so the
seccomp filter blocks the network and protects the host from signals, RLIMIT_NPROC counts against the user,
and cleanup walks the fork server's subtree.

The test process is root here, so it starts a real unprivileged host: a launcher makes the (possibly 0700
/root-based) interpreter visible in a private mount namespace, drops to uid 65534 and execs Python, which then
uses PythonSandbox normally."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to start an unprivileged host process")

NOBODY = 65534

_LAUNCHER = textwrap.dedent("""
    import os, sys
    from tepo_ray.tools import sandbox_worker as w
    w._unshare(w.CLONE_NEWNS)
    w._mount(None, "/", None, w.MS_REC | w.MS_PRIVATE)
    exposed = w._interpreter_paths()
    keep = {p: os.open(p, os.O_PATH | os.O_DIRECTORY) for paths in exposed.values() for p in paths}
    for hidden in exposed:
        w._mount("tmpfs", hidden, "tmpfs", w.MS_NOSUID | w.MS_NODEV, "size=1m,mode=755")
    for path, fd in keep.items():
        os.makedirs(path, exist_ok=True)
        w._mount(f"/proc/self/fd/{fd}", path, None, w.MS_BIND | w.MS_REC)
    os.setgroups([])
    os.setresgid(@UID@, @UID@, @UID@)
    os.setresuid(@UID@, @UID@, @UID@)
    os.chdir("/")
    os.execv(sys.executable, [sys.executable, "-c", sys.argv[1], *sys.argv[2:]])
""").replace("@UID@", str(NOBODY))

_HOST = textwrap.dedent("""
    import json, os, sys, time
    from tepo_ray.tools.python_sandbox import PythonSandbox
    port = int(sys.argv[1])
    out = {}
    with PythonSandbox(timeout_s=5.0, prestarted=1, max_processes=8, max_output_chars=4000, grace_s=2.0) as sb:
        out["info"] = sb.ready()[0]
        out["uid"] = sb.run("import os\\nos.getuid()").stdout
        out["net"] = sb.run(
            "import socket\\ntry:\\n    s = socket.socket()\\n    s.settimeout(1)\\n"
            f"    s.connect(('127.0.0.1', {port}))\\n    print('connected')\\n"
            "except OSError as e:\\n    print('blocked', e.errno)").stdout
        out["kill"] = sb.run(
            "import os, signal\\n"
            f"for pid in (os.getppid(), {os.getpid()}, -{os.getpgrp()}, -1):\\n"
            "    try:\\n        os.kill(pid, signal.SIGKILL)\\n        print('killed', pid)\\n"
            "    except OSError as e:\\n        print('denied', pid, e.errno)").stdout
        out["forks"] = sb.run(
            "import os, time\\nn = 0\\nfor _ in range(50):\\n    try:\\n        if os.fork() == 0:\\n"
            "            time.sleep(3)\\n            os._exit(0)\\n        n += 1\\n    except OSError:\\n"
            "        break\\nprint(n)").stdout
        bg = sb.run("import subprocess\\np = subprocess.Popen(['sleep', '60'], start_new_session=True)\\np.pid")
        pid = int(bg.stdout)
        try:
            out["bg_alive"] = open(f"/proc/{pid}/cmdline", "rb").read() == b"sleep\\x0060\\x00"
        except OSError:
            out["bg_alive"] = False
        out["server_children"] = open(f"/proc/{out['info']['pid']}/task/{out['info']['pid']}/children").read()
        out["after"] = sb.run("print('still fine')").stdout
        out["work_root"] = sb.work_root
    out["work_root_exists"] = os.path.exists(out["work_root"])
    print(json.dumps(out))
""")


def _stage_sandbox_package() -> str:
    """A world-readable copy of the (standard-library-only) sandbox modules for the uid-65534 host:
    the checkout itself may sit in a 0700 directory (e.g. a fresh clone under mktemp -d)."""
    import shutil
    import tempfile
    from pathlib import Path

    import tepo_ray.tools.python_sandbox as sandbox_mod

    src = Path(sandbox_mod.__file__).resolve().parent  # tepo_ray/tools
    stage = Path(tempfile.mkdtemp(prefix="tepo-nonroot-"))
    (stage / "tepo_ray" / "tools").mkdir(parents=True)
    (stage / "tepo_ray" / "__init__.py").write_text("")
    (stage / "tepo_ray" / "tools" / "__init__.py").write_text("")
    for name in ("python_sandbox.py", "sandbox_worker.py"):
        shutil.copy(src / name, stage / "tepo_ray" / "tools" / name)
    for d, _, files in os.walk(stage):
        os.chmod(d, 0o755)
        for f in files:
            os.chmod(os.path.join(d, f), 0o644)
    return str(stage)


def test_unprivileged_host():
    import shutil

    stage = _stage_sandbox_package()
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    srv.settimeout(0.5)
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _LAUNCHER, _HOST, str(srv.getsockname()[1])],
            capture_output=True, text=True, timeout=120,
            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONPATH": stage},
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        with pytest.raises(socket.timeout):
            srv.accept()
    finally:
        srv.close()
        shutil.rmtree(stage, ignore_errors=True)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    info = out["info"]
    assert (info["drop_privileges"], info["mount_isolation"], info["uid"], info["pid_namespace"]) == (False, False, None,
                                                                                         False)
    assert info["network"] == "seccomp" and info["seccomp"]  # auto: no namespace without root here
    assert out["uid"] == f"{NOBODY}\n"
    assert out["net"].startswith("blocked 1"), out["net"]  # EPERM from the filter
    assert "killed" not in out["kill"] and out["kill"].count("denied") == 4, out["kill"]
    # RLIMIT_NPROC = processes the user already has + max_processes (8): the snippet gets at most 7 children.
    assert 1 <= int(out["forks"]) <= 7, out["forks"]
    assert out["bg_alive"] is False and out["server_children"].strip() == ""
    assert out["after"] == "still fine\n"
    assert out["work_root_exists"] is False
