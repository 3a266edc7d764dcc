"""Total-memory cap across all processes of one snippet (cgroup v2 or v1, else the reported fallback)."""

from __future__ import annotations

import pytest

from tepo_ray.tools.python_sandbox import PythonSandbox, SandboxErrorKind
from tepo_ray.tools.sandbox_worker import detect_memory_cgroup

# Four processes of ~70 MB each: every one is under the per-process limit (160 MB of address space),
# together they are over the 160 MB total.
FORK_AND_ALLOCATE = """
import os, time
pids = []
for _ in range(4):
    pid = os.fork()
    if pid == 0:
        block = bytearray(70 << 20)
        for i in range(0, len(block), 4096):
            block[i] = 1
        time.sleep(1.5)
        os._exit(0)
    pids.append(pid)
codes = [os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) for p in pids]
print(codes)
raise SystemExit(1 if any(codes) else 0)
"""


def test_ready_reports_the_memory_cap_mode():
    mode, _ = detect_memory_cgroup()
    with PythonSandbox(prestarted=1, memory_mb=160, total_memory_mb=160) as sb:
        assert {info["memory_cap"] for info in sb.ready()} == {mode}


def test_snippet_processes_together_cannot_exceed_the_total_cap():
    mode, _ = detect_memory_cgroup()
    if mode == "rlimit":
        pytest.skip("no writable memory cgroup here: the fallback (per-process RLIMIT_AS) is reported by ready()")
    with PythonSandbox(prestarted=1, memory_mb=160, total_memory_mb=160, max_processes=16, timeout_s=20,
                       cpu_time_s=15) as sb:
        capped = sb.run(FORK_AND_ALLOCATE)
        assert capped.error == SandboxErrorKind.MEMORY, (capped.error, capped.stdout, capped.stderr)
        assert "-9" in capped.stdout  # the kernel OOM-killed children that were each under their own limit
        fine = sb.run("x = bytearray(40 << 20)\nprint('ok')")
        assert fine.error is None and fine.stdout.strip() == "ok"
    with PythonSandbox(prestarted=1, memory_mb=160, total_memory_mb=1024, max_processes=16, timeout_s=20,
                       cpu_time_s=15) as sb:  # the same snippet under a larger total cap succeeds
        roomy = sb.run(FORK_AND_ALLOCATE)
        assert roomy.error is None, (roomy.error, roomy.stdout, roomy.stderr)
