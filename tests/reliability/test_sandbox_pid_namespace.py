"""Each snippet in its own PID namespace (root hosts; `PythonSandbox.ready()` reports `pid_namespace`): it
cannot see or name any process outside its call, and what it starts dies with it. Off (or unavailable),
the same snippet sees the host -- the contrast that shows the namespace does the hiding."""

from __future__ import annotations

import os

import pytest

from tepo_ray.tools.python_sandbox import PythonSandbox, SandboxErrorKind
from tepo_ray.tools.sandbox_worker import _uid_processes

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="PID namespaces need root (CAP_SYS_ADMIN)")


def _make(**kw) -> PythonSandbox:
    args = dict(timeout_s=5.0, memory_mb=256, max_processes=16, max_output_chars=2000, prestarted=1)
    return PythonSandbox(**{**args, **kw})


_LIST_PROCESSES = """
import os, subprocess
child = subprocess.Popen(['sleep', '30'])
seen = {}
for entry in os.listdir('/proc'):
    if entry.isdigit():
        try:
            seen[int(entry)] = open(f'/proc/{entry}/cmdline', 'rb').read().split(b'\\0')[0].decode()
        except OSError:
            pass
try:
    os.kill(HOST, 0)
    host = 'visible'
except PermissionError:
    host = 'visible'  # there, only not ours to signal
except ProcessLookupError:
    host = 'absent'
print(os.getpid(), os.getppid(), host, len(seen), HOST in seen, sorted(seen.items())[:5])
child.kill()
"""


def test_snippet_has_its_own_pid_namespace():
    """Its own PID namespace: /proc lists only the namespace's init, the snippet and its child; the host's pid
    names nothing."""
    with _make() as sandbox:
        (info,) = sandbox.ready()
        if not info["pid_namespace"]:
            pytest.skip("this kernel/container refuses a PID namespace; ready() reports pid_namespace=False")
        res = sandbox.run(_LIST_PROCESSES.replace("HOST", str(os.getpid())))
        assert res.error is None, res
        pid, ppid, host, count, host_listed, seen = res.stdout.split(" ", 5)
        assert (pid, ppid) == ("2", "1")  # pid 1 is the namespace's init (the sandbox's reaper)
        assert (host, count, host_listed) == ("absent", "3", "False")
        seen = dict(eval(seen))  # noqa: S307 - our own snippet's repr of a list
        assert sorted(seen) == [1, 2, 3] and "sleep" in seen[3], seen  # init, the snippet, its sleep
    with _make(pid_namespace=False) as sandbox:  # the same snippet without one sees the host
        (info,) = sandbox.ready()
        assert info["pid_namespace"] is False
        res = sandbox.run(_LIST_PROCESSES.replace("HOST", str(os.getpid())))
        pid, ppid, host, count, host_listed, _ = res.stdout.split(" ", 5)
        assert (int(ppid), host, host_listed) == (info["pid"], "visible", "True") and int(count) > 3


def test_everything_a_snippet_started_dies_with_it():
    """A daemon that double-forks out of the snippet's session is gone when the call returns."""
    code = ("import os, time\n"
            "if os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        time.sleep(60)\n    os._exit(0)\n"
            "print('started')")
    with _make() as sandbox:
        (info,) = sandbox.ready()
        if not info["pid_namespace"]:
            pytest.skip("no PID namespace here")
        res = sandbox.run(code)
        assert res.error is None and res.stdout == "started\n", res
        left = _uid_processes(info["uid"])  # zombies included
        assert left == [], f"processes of the sandbox uid survived the call: {left}"


def test_signals_keep_their_meaning_inside_the_namespace():
    """The snippet is not the namespace's init (pid 1 ignores signals without a handler), so a CPU-time
    signal or a signal it sends itself still ends it, and the host sees the real signal."""
    with _make(cpu_time_s=1, timeout_s=20.0) as sandbox:
        if not sandbox.ready()[0]["pid_namespace"]:
            pytest.skip("no PID namespace here")
        term = sandbox.run("import os, signal\nos.kill(os.getpid(), signal.SIGTERM)\nprint('survived')")
        assert (term.error, term.exit_code, term.stdout) == (SandboxErrorKind.KILLED, -15, ""), term
        spin = sandbox.run("while True:\n    pass")
        assert spin.error == SandboxErrorKind.CPU_TIME and spin.exit_code == -24, spin  # SIGXCPU
