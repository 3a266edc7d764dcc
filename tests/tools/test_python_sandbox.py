"""PythonSandbox against real abusive snippets: each call must come back within its limit with a clear error,
and the host must be unaffected (still works, no secret leaked, no stray process, no file outside the work
dir, work dir removed). Everything here runs real processes; nothing is mocked."""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tepo_ray.config import PythonToolConfig, load_config
from tepo_ray.tools.python_sandbox import (
    TRUNCATION_MARKER,
    PythonSandbox,
    SandboxErrorKind,
    format_observation,
    run_code,
)

IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="uid drop / namespaces need root")
GRACE_S = 1.5  # host-side grace used by the sandboxes below
SLACK_S = 2.0  # scheduling slack on a loaded 2-core machine


# ------------------------------------------------------------------------------------------------ helpers
def _real_uid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Uid:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X")
    except (OSError, IndexError):
        return True


def _pids_of_uid(uid: int) -> list[int]:
    """Live (non-zombie) processes whose real uid is `uid`; an orphan's zombie is pid 1's to reap."""
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and _real_uid(int(p)) == uid and not _is_zombie(int(p))]


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def _assert_clean(sb: PythonSandbox) -> None:
    """No process left by any snippet, and no run directory left behind."""
    for info in sb.ready():
        assert _children(info["pid"]) == [], f"server {info['pid']} still has children"
        if info["uid"] is not None:
            assert _pids_of_uid(info["uid"]) == [], f"processes of sandbox uid {info['uid']} survived"
    assert os.listdir(sb.work_root) == []


_CREATED: list[PythonSandbox] = []


def _make(**kw) -> PythonSandbox:
    args = dict(timeout_s=2.0, cpu_time_s=5, memory_mb=256, max_processes=16, max_output_chars=500, prestarted=1,
                grace_s=GRACE_S)
    args.update(kw)
    sandbox = PythonSandbox(**args)
    _CREATED.append(sandbox)
    return sandbox


@pytest.fixture(autouse=True)
def _sandboxes_clean_up_after_themselves():
    """Every sandbox a test closed has stopped its servers and removed its work root (with any leftovers)."""
    start = len(_CREATED)
    yield
    for sandbox in _CREATED[start:]:
        if sandbox._pool.closed:
            assert not os.path.exists(sandbox.work_root), sandbox.work_root
            assert sandbox.worker_pids() == []


@pytest.fixture(scope="module")
def sb():
    with _make(prestarted=2) as sandbox:
        yield sandbox
    assert not os.path.exists(sandbox.work_root)


# ------------------------------------------------------------------------------------------------ normal cases
@pytest.mark.parametrize(
    "code, stdout",
    [
        ("print('hello')", "hello\n"),
        ("123*456", "56088\n"),  # Jupyter-style display of the last bare expression
        ("x = 2\nx + 1", "3\n"),
        ("print(1)\n2", "1\n2\n"),
        ("'a'", "'a'\n"),  # repr, like a notebook
        ("None", ""),
        ("x = 5", ""),
        ("import math\nmath.factorial(20)", "2432902008176640000\n"),
        ("for i in range(3):\n    i", ""),  # the last statement is a loop, not an expression
    ],
)
def test_stdout_and_last_expression(sb, code, stdout):
    res = sb.run(code)
    assert (res.stdout, res.stderr, res.error, res.exit_code, res.timed_out) == (stdout, "", None, 0, False)


def test_exception_has_traceback_without_sandbox_frames(sb):
    res = sb.run("def f():\n    return 1 / 0\nprint('before')\nf()")
    assert res.error == SandboxErrorKind.EXCEPTION and res.exit_code == 1
    assert res.stdout == "before\n"
    assert res.stderr.startswith("Traceback (most recent call last):")
    assert 'File "<code>", line 2, in f' in res.stderr and "return 1 / 0" in res.stderr
    assert res.stderr.rstrip().endswith("ZeroDivisionError: division by zero")
    assert "sandbox_worker" not in res.stderr
    assert format_observation(res, max_chars=2000) == res.stdout + res.stderr


def test_syntax_error(sb):
    res = sb.run("print('ok')\ndef f(:\n    pass")
    assert res.error == SandboxErrorKind.SYNTAX_ERROR and res.exit_code == 1
    assert res.stdout == ""  # nothing ran
    assert "SyntaxError" in res.stderr and 'File "<code>", line 2' in res.stderr


@pytest.mark.parametrize(
    "code, exit_code, error, stderr",
    [
        ("import sys\nsys.exit(3)", 3, SandboxErrorKind.NONZERO_EXIT, ""),
        ("import sys\nsys.exit(0)", 0, None, ""),
        ("import sys\nsys.exit('bye')", 1, SandboxErrorKind.NONZERO_EXIT, "bye\n"),
        ("import os\nos._exit(7)", 7, SandboxErrorKind.NONZERO_EXIT, ""),
    ],
)
def test_exit_codes(sb, code, exit_code, error, stderr):
    res = sb.run(code)
    assert (res.exit_code, res.error, res.stderr) == (exit_code, error, stderr)


def test_non_utf8_output_is_escaped(sb):
    res = sb.run("import sys\n_ = sys.stdout.buffer.write(b'ok\\xff\\xfe\\n')\n_ = sys.stderr.buffer.write(b'\\x80')")
    assert res.error is None
    assert res.stdout == "ok\\xff\\xfe\n" and res.stderr == "\\x80"
    assert "\\xff" in format_observation(res, max_chars=100)


def test_snippet_sees_fresh_state_and_can_use_subprocesses(sb):
    sb.run("import json\nopen('state.txt', 'w').write('x')\njson.loads = None")
    res = sb.run("import os, json, subprocess\nprint(os.listdir('.'), json.loads('[1]'))\n"
                 "print(subprocess.run(['echo', 'hi'], capture_output=True, text=True).stdout, end='')")
    assert res.stdout == "[] [1]\nhi\n", res


def test_rlimits_are_applied(sb):
    res = sb.run(
        "import resource as r\n"
        "print([r.getrlimit(x)[0] for x in (r.RLIMIT_CPU, r.RLIMIT_AS, r.RLIMIT_NPROC, r.RLIMIT_FSIZE, r.RLIMIT_NOFILE,"
        " r.RLIMIT_CORE)])\n"
        "try:\n    open('big.bin', 'wb').write(b'x' * (17 << 20))\nexcept OSError as e:\n    print('fsize', e.errno)\n"
        "fs = []\ntry:\n    for _ in range(100): fs.append(open('big.bin', 'rb'))\nexcept OSError as e:\n"
        "    print('nofile', e.errno, len(fs))\n")
    assert res.error is None, res
    lines = res.stdout.splitlines()
    expected_nproc = 16 if IS_ROOT else None
    cpu, mem, nproc, fsize, nofile, core = eval(lines[0])  # noqa: S307 - our own output
    assert (cpu, mem, fsize, nofile, core) == (5, 256 << 20, 16 << 20, 64, 0)
    if expected_nproc is not None:
        assert nproc == expected_nproc
    assert lines[1] == "fsize 27"  # EFBIG
    assert lines[2].startswith("nofile 24 ")  # EMFILE before 100 files


# ------------------------------------------------------------------------------------------------ abuse
def test_infinite_loop_times_out_and_keeps_earlier_output(sb):
    t0 = time.monotonic()
    res = sb.run("print('started')\nwhile True:\n    pass", timeout_s=1.0)
    elapsed = time.monotonic() - t0
    assert res.error == SandboxErrorKind.TIMEOUT and res.timed_out and res.exit_code is None
    assert res.stdout == "started\n"
    assert 1.0 <= res.duration_s and elapsed < 1.0 + GRACE_S + SLACK_S
    assert "timeout" in format_observation(res, max_chars=200)
    _assert_clean(sb)


def test_sleeping_snippet_times_out(sb):
    t0 = time.monotonic()
    res = sb.run("import time\ntime.sleep(60)", timeout_s=0.5)
    assert res.error == SandboxErrorKind.TIMEOUT and time.monotonic() - t0 < 0.5 + GRACE_S + SLACK_S


def test_cpu_time_limit():
    with _make(cpu_time_s=1, timeout_s=20.0) as sandbox:
        t0 = time.monotonic()
        res = sandbox.run("while True:\n    pass")
        assert res.error == SandboxErrorKind.CPU_TIME and not res.timed_out
        assert res.exit_code == -signal.SIGXCPU
        assert time.monotonic() - t0 < 20.0
        assert "CPU time" in format_observation(res, max_chars=200)


@needs_root
def test_fork_bomb_is_capped_and_fully_killed():
    with _make(max_processes=16, timeout_s=2.0) as sandbox:
        (info,) = sandbox.ready()
        uid = info["uid"]
        peak = [0]
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], len(_pids_of_uid(uid)))
                time.sleep(0.05)

        sampler = threading.Thread(target=sample)
        sampler.start()
        t0 = time.monotonic()
        try:
            res = sandbox.run("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass")
        finally:
            stop.set()
            sampler.join()
        assert res.error == SandboxErrorKind.TIMEOUT
        assert time.monotonic() - t0 < 2.0 + GRACE_S + SLACK_S
        assert 2 <= peak[0] <= 16, f"the bomb ran {peak[0]} processes at once (limit 16)"
        assert _pids_of_uid(uid) == []
        _assert_clean(sandbox)
        assert subprocess.run(["true"]).returncode == 0  # the host can still fork
        assert sandbox.run("print('alive')").stdout == "alive\n"


def _pids_running(cmdline: bytes) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and Path(f"/proc/{entry}/cmdline").read_bytes() == cmdline:
                found.append(int(entry))
        except OSError:
            pass
    return found


def test_background_processes_die_with_the_snippet(sb):
    marker = f"{60 + os.getpid() % 1000}.{uuid.uuid4().int % 10 ** 6}"  # a sleep only this test starts
    res = sb.run(f"import subprocess\np = subprocess.Popen(['sleep', '{marker}'], start_new_session=True)\n"
                 "print(p.pid)")
    assert res.error is None
    assert _pids_running(f"sleep\x00{marker}\x00".encode()) == [], "the detached child outlived the snippet"
    _assert_clean(sb)


@pytest.mark.parametrize("code", ["x = bytearray(10 ** 10)", "a = []\nwhile True:\n    a.append(' ' * 10 ** 6)"])
def test_memory_bomb(sb, code):
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    res = sb.run(code, timeout_s=10.0)
    assert res.error == SandboxErrorKind.MEMORY, res
    assert "MemoryError" in res.stderr
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 100 * 1024  # KiB
    _assert_clean(sb)


def test_one_gigabyte_print_is_cut_without_reading_it_all(sb):
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.monotonic()
    res = sb.run("import sys\nchunk = 'x' * (1 << 20)\nfor _ in range(1024):\n    sys.stdout.write(chunk)\n"
                 "print('never')", timeout_s=10.0)
    assert res.error == SandboxErrorKind.OUTPUT_LIMIT and res.truncated and res.exit_code is None
    assert time.monotonic() - t0 < 10.0  # killed at the output limit, not at the timeout
    assert TRUNCATION_MARKER in res.stdout and "never" not in res.stdout
    assert len(res.stdout) <= 500 + len(TRUNCATION_MARKER)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 100 * 1024  # KiB
    _assert_clean(sb)


def test_large_output_keeps_head_and_tail(sb):
    res = sb.run("print('START' + 'a' * (2 << 20))\nprint('END')")
    assert res.error is None and res.exit_code == 0 and res.truncated
    assert res.stdout.startswith("STARTaaa") and res.stdout.endswith("aaa\nEND\n")
    assert TRUNCATION_MARKER in res.stdout and len(res.stdout) == 500 + len(TRUNCATION_MARKER)


def test_no_file_written_outside_work_dir(sb, tmp_path):
    tag = uuid.uuid4().hex
    targets = [str(tmp_path / f"escape_{tag}"), f"/etc/escape_{tag}", f"/tmp/escape_{tag}",
               f"/var/tmp/escape_{tag}", f"/dev/shm/escape_{tag}", f"../escape_{tag}",
               os.path.join(sb.work_root, f"escape_{tag}")]
    res = sb.run(
        f"import os\nfor p in {targets!r}:\n"
        "    try:\n        open(p, 'w').write('x')\n        print('wrote', p)\n"
        "    except OSError as e:\n        print('denied', p, e.errno)\n"
        "open('inside.txt', 'w').write('x')\nprint('inside', os.path.exists('inside.txt'))")
    assert res.error is None, res
    assert "inside True" in res.stdout
    for target in targets:
        assert not os.path.isabs(target) or not os.path.exists(target), target
    assert not any(n.startswith("escape_") for n in os.listdir(sb.work_root))
    assert list(tmp_path.iterdir()) == []
    if IS_ROOT:  # private /tmp: a write there is not seen by the next call either
        assert f"wrote /tmp/escape_{tag}" in res.stdout
        again = sb.run(f"import os\nos.path.exists('/tmp/escape_{tag}')")
        assert again.stdout == "False\n"
    _assert_clean(sb)


@needs_root
def test_sysv_shared_memory_does_not_outlive_the_call(sb):
    key = 0x7E900000 + (os.getpid() & 0xFFFF)
    res = sb.run(f"import ctypes\nlibc = ctypes.CDLL(None)\nprint(libc.shmget({key}, 4096, 0o1000 | 0o600) >= 0)")
    assert res.stdout == "True\n", res
    assert f"{key:d}" not in Path("/proc/sysvipc/shm").read_text().split()  # private IPC namespace
    again = sb.run(f"import ctypes\nctypes.CDLL(None).shmget({key}, 0, 0)")
    assert again.stdout == "-1\n"  # and the next call starts without it


def test_server_error_is_reported_not_fatal():
    with _make() as sandbox:
        os.chmod(sandbox.work_root, 0o700)
        os.rename(sandbox.work_root, sandbox.work_root + ".moved")  # the server cannot create run dirs now
        try:
            res = sandbox.run("print(1)")
        finally:
            os.rename(sandbox.work_root + ".moved", sandbox.work_root)
        assert res.error == SandboxErrorKind.SANDBOX_FAILURE and "FileNotFoundError" in (res.detail or "")
        assert sandbox.run("print(2)").stdout == "2\n"  # same server keeps serving


def test_work_dir_is_fresh_and_removed(sb):
    results = {}

    def call() -> None:
        results["res"] = sb.run("import os, time\nprint(os.getcwd(), os.listdir('.'))\n"
                                "open('marker.txt', 'w').write('x')\ntime.sleep(1.0)", timeout_s=5.0)

    worker = threading.Thread(target=call)
    worker.start()
    seen = None
    deadline = time.monotonic() + 5.0
    while seen is None and time.monotonic() < deadline:
        for name in os.listdir(sb.work_root):
            if os.path.exists(os.path.join(sb.work_root, name, "marker.txt")):
                seen = os.path.join(sb.work_root, name)
        time.sleep(0.02)
    worker.join()
    res = results["res"]
    cwd, listing = res.stdout.split(" ", 1)
    assert listing.strip() == "[]"  # fresh
    assert seen == cwd  # the host saw the snippet's files in its work dir while it ran...
    assert not os.path.exists(cwd)  # ...and it is gone now
    assert os.listdir(sb.work_root) == []


def test_parent_env_secret_is_not_visible(monkeypatch):
    secret = "tepo-secret-" + uuid.uuid4().hex
    monkeypatch.setenv("TEPO_SECRET_TEST", secret)
    with _make(max_output_chars=1_000_000) as sandbox:  # nothing may hide in a truncated middle
        res = sandbox.run(
            "import os\nprint(dict(os.environ))\n"
            f"pids = ['self', str(os.getppid()), '{os.getpid()}', '1']\n"
            "pids += [p for p in os.listdir('/proc') if p.isdigit()]\n"
            "for p in pids:\n"
            "    try:\n        print(p, open(f'/proc/{p}/environ', 'rb').read())\n"
            "    except OSError as e:\n        print(p, 'denied', e.errno)\n")
        assert res.error is None and not res.truncated, res
    assert "'LANG': 'C.UTF-8'" in res.stdout  # the snippet printed its own environment...
    assert secret not in res.stdout + res.stderr  # ...but not the host's
    if IS_ROOT:
        assert f"\n{os.getpid()} denied" in res.stdout


def _listener() -> socket.socket:
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(0.5)
    return srv


def _connect_snippet(port: int) -> str:
    return ("import socket\n"
            f"try:\n    s = socket.socket()\n    s.settimeout(1)\n    s.connect(('127.0.0.1', {port}))\n"
            "    s.sendall(b'leak')\n    print('connected')\n"
            "except OSError as e:\n    print('blocked', type(e).__name__, e.errno)\n")


@pytest.mark.parametrize("mode", ["namespace", "seccomp", "audit"])
def test_network_is_blocked(mode):
    if mode == "namespace" and not IS_ROOT:
        pytest.skip("network namespaces need root here")
    srv = _listener()
    try:
        with _make(network_mode=mode) as sandbox:
            assert sandbox.ready()[0]["network"] == mode
            res = sandbox.run(_connect_snippet(srv.getsockname()[1]))
            # Name resolution: seccomp/namespace stop the resolver's own sockets; audit refuses the call itself.
            dns = sandbox.run("import socket\nsocket.getaddrinfo('localhost', 80)")
        assert res.stdout.startswith("blocked"), res
        if mode == "audit":
            assert dns.error == SandboxErrorKind.EXCEPTION and "disabled in this sandbox" in dns.stderr
        with pytest.raises(socket.timeout):
            srv.accept()
    finally:
        srv.close()
    if mode == "namespace":
        assert "101" in res.stdout  # ENETUNREACH
    elif mode == "seccomp":
        assert "PermissionError 1" in res.stdout


def test_network_allowed_when_isolation_is_off():
    """Positive control: the same snippet does reach the listener without isolation."""
    srv = _listener()
    try:
        with _make(isolate_network=False) as sandbox:
            res = sandbox.run(_connect_snippet(srv.getsockname()[1]))
        conn, _ = srv.accept()
        assert conn.recv(4) == b"leak"
        conn.close()
    finally:
        srv.close()
    assert res.stdout == "connected\n"


def test_cannot_kill_host_or_server(sb):
    server_pids = sorted(sb.worker_pids())
    # In its own PID namespace the snippet is pid 1 and getppid() is 0 (itself and its group): name the
    # server, the host and the host's group by their real pids instead.
    pidns = all(info["pid_namespace"] for info in sb.ready())
    targets = [*server_pids, os.getpid(), -os.getpgrp()] + ([] if pidns else ["os.getppid()", 1])
    res = sb.run(
        "import os, signal\n"
        f"for pid in ({', '.join(map(str, targets))}):\n"
        "    try:\n        os.kill(pid, signal.SIGKILL)\n        print('killed', pid)\n"
        "    except OSError as e:\n        print('denied', pid, e.errno)\n")
    assert res.error is None, res
    assert "killed" not in res.stdout
    assert sorted(sb.worker_pids()) == server_pids
    for pid in server_pids:
        os.kill(pid, 0)  # still alive
    assert sb.run("print('still here')").stdout == "still here\n"


def test_recursion_error(sb):
    res = sb.run("def f(n):\n    return f(n + 1)\nf(0)")
    assert res.error == SandboxErrorKind.EXCEPTION
    assert "RecursionError" in res.stderr and "Previous line repeated" in res.stderr


def test_deep_recursion_with_raised_limit_hits_the_memory_limit():
    # CPython 3.11 keeps Python frames on the heap: the recursion ends in MemoryError under RLIMIT_AS, which
    # CPython sometimes turns into SystemError while unwinding; either way an error, not a hang or a timeout.
    with _make(memory_mb=64, timeout_s=20.0) as sandbox:
        res = sandbox.run("import sys\nsys.setrecursionlimit(10 ** 8)\ndef f(n):\n    return f(n + 1)\nf(0)")
    assert res.error in (SandboxErrorKind.MEMORY, SandboxErrorKind.EXCEPTION, SandboxErrorKind.CRASHED), res
    assert not res.timed_out and 'File "<code>", line 4, in f' in res.stderr
    assert "[Previous line repeated" in res.stderr and len(res.stderr) < 10_000  # innermost frames only


def test_native_crash_is_reported(sb):
    res = sb.run("import ctypes\nctypes.string_at(0)")
    assert res.error == SandboxErrorKind.CRASHED and res.exit_code == -signal.SIGSEGV
    assert "SIGSEGV" in format_observation(res, max_chars=200)


# ------------------------------------------------------------------------------------------------ pool
def test_concurrent_runs_from_threads(sb):
    codes = [f"import time, os\ntime.sleep(0.2)\nprint({i} * {i}, os.getuid())" for i in range(8)]
    with ThreadPoolExecutor(4) as ex:
        results = list(ex.map(sb.run, codes))
    for i, res in enumerate(results):
        assert res.error is None, res
        assert int(res.stdout.split()[0]) == i * i
    if IS_ROOT:
        assert len({r.stdout.split()[1] for r in results}) >= 2  # concurrent calls ran under different uids
    _assert_clean(sb)


def test_killed_worker_is_replaced():
    with _make(prestarted=2) as sandbox:
        old = set(sandbox.worker_pids())
        for pid in old:
            os.kill(pid, signal.SIGKILL)
        res = sandbox.run("print(6 * 7)")
        assert (res.stdout, res.error) == ("42\n", None)
        assert not old & set(sandbox.worker_pids())
        assert len(sandbox.ready()) == 2
        (pid,) = sandbox.worker_pids()[:1]
        os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
        assert sandbox.replace_dead_workers() == 1  # the health check finds and replaces it
        assert pid not in sandbox.worker_pids() and len(sandbox.ready()) == 2


def test_worker_killed_mid_call():
    with _make(timeout_s=20.0) as sandbox:
        (info,) = sandbox.ready()
        out = {}
        worker = threading.Thread(target=lambda: out.update(res=sandbox.run("import time\ntime.sleep(30)")))
        worker.start()
        deadline = time.monotonic() + 5
        while not _children(info["pid"]) and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(info["pid"], signal.SIGKILL)
        t0 = time.monotonic()
        worker.join(timeout=15)
        assert not worker.is_alive() and time.monotonic() - t0 < 10
        assert out["res"].error == SandboxErrorKind.SANDBOX_FAILURE
        if info["uid"] is not None:
            assert _pids_of_uid(info["uid"]) == []  # the orphaned snippet was swept
        assert os.listdir(sandbox.work_root) == []  # and its run dir removed by the host
        assert sandbox.run("print('ok')").stdout == "ok\n"


def test_hung_idle_worker_is_replaced_and_the_call_retried():
    with _make(timeout_s=5.0) as sandbox:
        (pid,) = sandbox.worker_pids()
        os.kill(pid, signal.SIGSTOP)
        t0 = time.monotonic()
        res = sandbox.run("print(1)")
        assert (res.stdout, res.error) == ("1\n", None)  # ran on a fresh server after the ack timed out
        assert time.monotonic() - t0 < GRACE_S + SLACK_S
        assert pid not in sandbox.worker_pids() and not os.path.exists(f"/proc/{pid}")


def test_worker_hanging_mid_call_gives_sandbox_failure():
    with _make(timeout_s=0.5) as sandbox:
        (info,) = sandbox.ready()
        threading.Timer(0.3, os.kill, (info["pid"], signal.SIGSTOP)).start()
        t0 = time.monotonic()
        res = sandbox.run("import time\ntime.sleep(0.4)\nprint('done')")
        assert res.error == SandboxErrorKind.SANDBOX_FAILURE and res.timed_out and res.exit_code is None
        assert time.monotonic() - t0 < 0.5 + GRACE_S + SLACK_S
        assert "sandbox_failure" in format_observation(res, max_chars=200)
        assert info["pid"] not in sandbox.worker_pids()
        if info["uid"] is not None:
            assert _pids_of_uid(info["uid"]) == []
        assert sandbox.run("print(2)").stdout == "2\n"


def test_close_stops_servers_and_removes_work_root():
    sandbox = _make(prestarted=2)
    pids, root = sandbox.worker_pids(), sandbox.work_root
    assert sandbox.run("print(1)").stdout == "1\n"
    sandbox.close()
    assert not os.path.exists(root)
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}")
    with pytest.raises(RuntimeError, match="closed"):
        sandbox.run("print(1)")


# ------------------------------------------------------------------------------------------------ API
def test_from_config_and_run_code():
    cfg = PythonToolConfig(call_timeout_s=1.5, max_output_chars=50, prestarted=1, network_mode="seccomp")
    with PythonSandbox.from_config(cfg) as sandbox:
        assert sandbox.timeout_s == 1.5 and sandbox.ready()[0]["network"] == "seccomp"
        res = sandbox.run("print('x' * 1000)")
        assert res.truncated and len(res.stdout) == 50 + len(TRUNCATION_MARKER)
    node = load_config(overrides=["tools.python.call_timeout_s=2.5", "tools.python.prestarted=1"]).tools.python
    with PythonSandbox.from_config(node) as sandbox:  # an omegaconf node (what an actor receives) works too
        assert sandbox.timeout_s == 2.5 and sandbox.run("1 + 1").stdout == "2\n"
    assert run_code("print(6 * 7)", timeout_s=5.0).stdout == "42\n"
    assert run_code("while True: pass", timeout_s=0.5, grace_s=GRACE_S).error == SandboxErrorKind.TIMEOUT


def test_bad_arguments_fail_clearly(sb):
    with pytest.raises(ValueError, match="timeout_s"):
        PythonSandbox(timeout_s=0)
    with pytest.raises(ValueError, match="network_mode.*'auto'"):
        PythonSandbox(network_mode="bogus")
    with pytest.raises(ValueError, match="isolate_network"):
        PythonSandbox(network_mode="none")
    with pytest.raises(ValueError, match="memory_mb"):
        PythonSandbox(memory_mb=1)
    with pytest.raises(TypeError, match="expected str"):
        sb.run(b"print(1)")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timeout_s"):
        sb.run("print(1)", timeout_s=-1)


def test_broken_preload_fails_at_construction():
    with pytest.raises(Exception, match="no_such_module_xyz"):
        PythonSandbox(prestarted=1, preload=("no_such_module_xyz",))


def test_preloaded_module_is_available(sb):
    with _make(preload=("json",)) as sandbox:
        assert sandbox.run("import sys\n'json' in sys.modules").stdout == "True\n"


def test_host_process_unaffected_after_abuse(sb):
    """Runs last in this module: the fixture's servers survived everything above and nothing leaked."""
    assert sb.run("print(sum(range(10)))").stdout == "45\n"
    _assert_clean(sb)
    assert Path(sys.executable).exists() and subprocess.run([sys.executable, "-c", "pass"]).returncode == 0


_FORK_FAILS = """
import errno, json, os, sys, tempfile
from tepo_ray.tools import sandbox_worker as w
root = tempfile.mkdtemp()
os.chmod(root, 0o711)
cfg = {"work_root": root, "lock_dir": os.path.join(tempfile.gettempdir(), "tepo_sandbox_uids"), "uid_base": 61000,
       "uid_count": 2000, "network_mode": "none", "cpu_time_s": 5, "memory_mb": 256, "max_processes": 16,
       "max_file_mb": 16, "max_open_files": 64, "keep_bytes": 4000, "kill_bytes": 1 << 20, "tmpfs_mb": 16,
       "preload": [], "total_memory_mb": 256, "protected_pids": []}
server = w._Server(cfg)
null = os.open(os.devnull, os.O_WRONLY)
fds = sorted(os.listdir("/proc/self/fd"))
real_fork = os.fork
def no_fork():
    raise OSError(errno.EAGAIN, "fork refused (injected)")
os.fork = no_fork
try:
    server.run(b"print(1)", 5.0, null)
    raised = False
except OSError:
    raised = True
os.fork = real_fork
out = {"raised": raised, "fds_kept": sorted(os.listdir("/proc/self/fd")) == fds, "left": os.listdir(root)}
res = server.run(b"print(1)", 5.0, null)
out["after"] = res["exit_code"]
print(json.dumps(out))
"""


@needs_root
def test_a_refused_fork_leaves_no_fd_dir_or_cgroup_behind():
    """The fork server survives fork() failing (pid or namespace limits): nothing leaks, the next call runs."""
    res = subprocess.run([sys.executable, "-c", _FORK_FAILS], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.splitlines()[-1]) == {"raised": True, "fds_kept": True, "left": [], "after": 0}
