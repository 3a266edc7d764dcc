"""Sandboxed Python interpreter tool: run a model's code snippet in a fresh, confined process.

Each `PythonSandbox.run(code)` call executes `code` in a new OS process forked from a pre-started, warm
interpreter (a fork server, `tepo_ray/tools/sandbox_worker.py`), with

* limits: wall-clock timeout (the whole process tree is killed), CPU time, address space, processes
  (RLIMIT_NPROC; as root the child runs under a uid owned by its fork server alone, so the kernel enforces
  it), file size, open files, no core dumps;
* a fresh working directory (HOME too), removed afterwards; as root also a private /tmp, /var/tmp, /dev/shm
  and a read-only root filesystem (mount namespace);
* a scrubbed environment: the fork server starts with a minimal env, so host secrets never reach it;
* no network: a network namespace where the machine allows it, else a seccomp filter (no root needed), else
  a Python audit-hook guard (`network_mode`, see `NetworkMode`);
* stdout/stderr captured in bounded memory (a head and a tail of each stream are kept; a snippet printing
  more than `output_kill_bytes` is killed), cut to `max_output_chars` with a visible `[truncated]` marker.

Model-facing convention (Jupyter's): the snippet's stdout is the observation, and if the last statement is a
bare expression its `repr` is printed unless it is None -- agents write `123 * 456` and expect `56088`.
Uncaught exceptions print a traceback (without sandbox frames) to stderr. `format_observation` is the ONE
place where a `SandboxResult` becomes the text shown to the model.

Each call holds one fork server exclusively; `run` is safe from many threads and from asyncio via
`asyncio.to_thread` (extra servers start on demand; up to max(prestarted, peak concurrency) stay warm).
A server that died or hung is killed, its processes swept, its run dir removed, and replaced; a call whose
server did not acknowledge it (died or hung before forking the snippet) is retried once on a fresh server,
so a snippet runs at most once unless its server fails before starting it.

Isolation levels (`PythonSandbox.ready()` reports what a machine got):
* root host (CI, containers; the measured setup of DESIGN.md section 5): everything above; the snippet runs as
  a uid from `uid_base..uid_base+uid_count-1` that no one else uses, cannot signal or ptrace the host, cannot
  read /proc/<host>/environ, cannot write anything that outlives the call. Each call also gets its own PID
  namespace (`pid_namespace`, where the kernel allows it): pid 1 there is a reaper and the snippet pid 2,
  /proc lists only the call's processes, it cannot name any other process, everything it started dies with
  it, and signals keep their usual meaning. It can still read world-readable files.
* non-root host: no uid drop and no namespaces. `auto` picks the seccomp network filter, which also refuses
  kill()/tkill()/tgkill()/pidfd_open() aimed at the host, the fork server or -1, and ptrace/process_vm_*;
  RLIMIT_NPROC is set to the user's current process count + max_processes; cleanup kills the fork server's
  whole subtree. Not protected: same-user files, /proc/<host>/environ (readable by the same user), signals
  to the host's other threads/processes by pid. Run tool pools as root in a container for full isolation.
* `network_mode="audit"` (no seccomp on this CPU architecture) only stops Python-level network use; native
  code can bypass it.

Linux only (pidfd, prctl, namespaces; kernel >= 5.3). Concurrent sandboxes on one machine, in any process,
share the uid range safely: each fork server holds its uid with a flock under `<tempdir>/tepo_sandbox_uids`.

Resource bounds to know: memory is bounded per process (RLIMIT_AS) and, where a writable memory cgroup exists
(v2, or v1), for all of a snippet's processes together (`total_memory_mb`, a cgroup per call); without one a
snippet can use up to max_processes x memory_mb in total (`ready()` reports `memory_cap`); the work dir lives on the host's temp filesystem and is bounded per file
(max_file_mb) and by time, not in total; the private /tmp, /var/tmp, /dev/shm are tmpfs of `tmpfs_mb` each.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

from tepo_ray.tools import sandbox_worker as _worker

__all__ = [
    "NetworkMode",
    "PythonSandbox",
    "SandboxErrorKind",
    "SandboxResult",
    "SandboxUnavailableError",
    "TRUNCATION_MARKER",
    "format_observation",
    "run_code",
]

log = logging.getLogger(__name__)

TRUNCATION_MARKER = "\n[truncated]\n"
WORKER_PATH = Path(__file__).with_name("sandbox_worker.py")
DEFAULT_UID_BASE = 61000  # sandbox children run as uid_base .. uid_base+uid_count-1 when the host is root
DEFAULT_UID_COUNT = 1000
_SERVER_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
_CRASH_SIGNALS = {signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT, signal.SIGILL, signal.SIGFPE}


class SandboxErrorKind(str, enum.Enum):
    """Why a call did not end normally (`SandboxResult.error`); compares equal to its string value."""

    TIMEOUT = "timeout"  # wall-clock limit: the process tree was killed
    CPU_TIME = "cpu_time"  # RLIMIT_CPU (SIGXCPU, or SIGKILL at the hard limit)
    MEMORY = "memory"  # MemoryError under the address-space limit
    OUTPUT_LIMIT = "output_limit"  # printed more than output_kill_bytes: killed
    SYNTAX_ERROR = "syntax_error"
    EXCEPTION = "exception"  # uncaught exception, traceback on stderr
    NONZERO_EXIT = "nonzero_exit"  # sys.exit(n) / os._exit(n) with n != 0
    CRASHED = "crashed"  # SIGSEGV/SIGBUS/SIGABRT/SIGILL/SIGFPE, e.g. C stack overflow
    KILLED = "killed"  # any other signal (the snippet killed itself, the kernel OOM killer, ...)
    SANDBOX_FAILURE = "sandbox_failure"  # the sandbox itself failed; not the snippet's fault


class NetworkMode(str, enum.Enum):
    """How network access is blocked. AUTO picks the first that works: NAMESPACE, SECCOMP, AUDIT."""

    AUTO = "auto"
    NAMESPACE = "namespace"  # empty network namespace (root / CAP_SYS_ADMIN); connect -> ENETUNREACH
    SECCOMP = "seccomp"  # kernel filter: socket() other than AF_UNIX -> EPERM (x86_64/aarch64, no root needed)
    AUDIT = "audit"  # sys.addaudithook guard: blocks socket/DNS/ctypes/spawning in Python; best effort only
    NONE = "none"  # no isolation (isolate_network=False)


class SandboxUnavailableError(RuntimeError):
    """The sandbox cannot start as configured (message says why and what to change)."""


@dataclass(frozen=True)
class SandboxResult:
    """Outcome of one snippet.

    stdout/stderr: decoded text (invalid UTF-8 as backslash escapes), each at most `max_output_chars`
    characters plus `TRUNCATION_MARKER`. exit_code: the process exit status (negative = killed by that
    signal), None when the sandbox killed it (timeout, output limit) or failed. timed_out: the wall-clock
    limit was hit. truncated: some output was dropped. duration_s: wall time from fork to exit.
    error: None when the snippet ran to completion with exit status 0, else a `SandboxErrorKind`.
    detail: diagnostics for operators (never shown to the model).
    """

    stdout: str
    stderr: str
    exit_code: Optional[int]
    timed_out: bool
    truncated: bool
    duration_s: float
    error: Optional[SandboxErrorKind]
    detail: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.error is None


# ------------------------------------------------------------------------------------------------ observation
def _error_note(result: SandboxResult) -> str:
    kind = result.error
    if kind is None or kind in (SandboxErrorKind.EXCEPTION, SandboxErrorKind.SYNTAX_ERROR):
        return ""  # the traceback on stderr says it
    if kind == SandboxErrorKind.TIMEOUT:
        return f"[error: timeout, execution stopped after {result.duration_s:.1f} s]"
    if kind == SandboxErrorKind.CPU_TIME:
        return "[error: cpu_time, CPU time limit exceeded]"
    if kind == SandboxErrorKind.MEMORY:
        return "[error: memory, memory limit exceeded]"
    if kind == SandboxErrorKind.OUTPUT_LIMIT:
        return "[error: output_limit, too much output, execution stopped]"
    if kind == SandboxErrorKind.NONZERO_EXIT:
        return f"[exit code {result.exit_code}]"
    if kind in (SandboxErrorKind.CRASHED, SandboxErrorKind.KILLED):
        return f"[error: {kind.value}, process killed by {_signal_name(result.exit_code)}]"
    return "[error: sandbox_failure, the code could not be run; try again]"


def _signal_name(exit_code: Optional[int]) -> str:
    if exit_code is None or exit_code >= 0:
        return f"exit status {exit_code}"
    try:
        return signal.Signals(-exit_code).name
    except ValueError:  # real-time signals have no name
        return f"signal {-exit_code}"


def format_observation(result: SandboxResult, *, max_chars: int) -> str:
    """The text the model sees for one call: stdout, then stderr, then a one-line error note.

    At most `max_chars` characters; when cut, the head and the tail of the output are kept around
    `TRUNCATION_MARKER` and the error note is always kept. "[no output]" when there is nothing to show.
    """
    if max_chars < 1:
        raise ValueError(f"format_observation(max_chars={max_chars!r}): expected >= 1")
    body = result.stdout
    if result.stderr:
        body += ("\n" if body and not body.endswith("\n") else "") + result.stderr
    note = _error_note(result)
    if not body and not note:
        return "[no output]"[:max_chars]
    sep = "\n" if body and note and not body.endswith("\n") else ""
    full = body + sep + note
    if len(full) <= max_chars:
        return full
    budget = max_chars - len(note) - len(sep) - len(TRUNCATION_MARKER)
    if budget < 2:
        return (TRUNCATION_MARKER.strip() + ("\n" + note if note else ""))[:max_chars]
    head = budget // 2
    tail = budget - head
    return body[:head] + TRUNCATION_MARKER + body[len(body) - tail:] + sep + note


# ------------------------------------------------------------------------------------------------ decoding
def _utf8_head(b: bytes) -> bytes:
    """Drop an incomplete UTF-8 sequence cut at the end."""
    for k in range(1, min(4, len(b)) + 1):
        c = b[-k]
        if c & 0xC0 == 0x80:
            continue
        need = 2 if c >> 5 == 0b110 else 3 if c >> 4 == 0b1110 else 4 if c >> 3 == 0b11110 else 1
        return b[:-k] if need > k else b
    return b


def _utf8_tail(b: bytes) -> bytes:
    """Drop continuation bytes of a UTF-8 sequence cut at the start."""
    i = 0
    while i < min(3, len(b)) and b[i] & 0xC0 == 0x80:
        i += 1
    return b[i:]


def _decode_stream(head: bytes, tail: bytes, total: int, max_chars: int) -> tuple[str, bool]:
    """Bounded head/tail bytes of a stream -> (text of at most max_chars + marker, truncated)."""
    h, t = max_chars // 2, max_chars - max_chars // 2
    if total == len(head) + len(tail):
        text = (head + tail).decode("utf-8", "backslashreplace")
        if len(text) <= max_chars:
            return text, False
        return text[:h] + TRUNCATION_MARKER + (text[-t:] if t else ""), True
    head_text = _utf8_head(head).decode("utf-8", "backslashreplace")
    tail_text = _utf8_tail(tail).decode("utf-8", "backslashreplace")
    return head_text[:h] + TRUNCATION_MARKER + (tail_text[-t:] if t else ""), True


# ------------------------------------------------------------------------------------------------ one server
class _ServerFailure(Exception):
    def __init__(self, message: str, *, started: bool, hung: bool) -> None:
        super().__init__(message)
        self.started = started  # the snippet was already forked when the server failed
        self.hung = hung  # the host's deadline passed (vs. the server died / spoke garbage)


def _write_all(fd: int, data: bytes, deadline: float) -> None:
    view = memoryview(data)
    while view:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("write to sandbox server timed out")
        _, w, _ = select.select([], [fd], [], remaining)
        if w:
            view = view[os.write(fd, view):]


def _read_exact(fd: int, n: int, deadline: float) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("read from sandbox server timed out")
        r, _, _ = select.select([fd], [], [], remaining)
        if r:
            chunk = os.read(fd, n - len(buf))
            if not chunk:
                return None
            buf += chunk
    return bytes(buf)


def _read_frame(fd: int, deadline: float, max_bytes: int) -> tuple[dict, bytes] | None:
    head = _read_exact(fd, _worker._HEADER.size, deadline)
    if head is None:
        return None
    jlen, plen = _worker._HEADER.unpack(head)
    if jlen + plen > max_bytes:
        raise ValueError(f"sandbox server sent a {jlen + plen}-byte frame (limit {max_bytes})")
    body = _read_exact(fd, jlen, deadline)
    payload = _read_exact(fd, plen, deadline) if plen else b""
    if body is None or payload is None:
        return None
    return json.loads(body), payload


class _Server:
    """Host handle of one fork-server process. Used by one thread at a time (the pool guarantees it)."""

    def __init__(self, *, python: str, config: dict, work_root: str, start_timeout_s: float) -> None:
        self.proc = subprocess.Popen(
            [python, "-I", str(WORKER_PATH)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=_SERVER_ENV,
            cwd=work_root, start_new_session=True, close_fds=True, bufsize=0,
        )
        self._in = self.proc.stdin.fileno()  # type: ignore[union-attr]
        self._out = self.proc.stdout.fileno()  # type: ignore[union-attr]
        os.set_blocking(self._in, False)
        self._deadline_ready = time.monotonic() + start_timeout_s
        self.info: dict | None = None
        self.child_pid: int | None = None
        self.workdir: str | None = None  # of the call in flight, to remove if the server dies
        self._max_frame = 2 * int(config["keep_bytes"]) + (1 << 20)
        body = json.dumps(config).encode()
        _write_all(self._in, _worker._HEADER.pack(len(body), 0) + body, self._deadline_ready)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def ensure_ready(self) -> dict:
        if self.info is None:
            try:
                frame = _read_frame(self._out, self._deadline_ready, self._max_frame)
            except (TimeoutError, ValueError) as exc:
                raise _ServerFailure(f"sandbox server did not start: {exc}", started=False, hung=True) from None
            if frame is None:
                raise _ServerFailure(f"sandbox server exited during start (status {self.proc.poll()})",
                                     started=False, hung=False)
            header = frame[0]
            if header.get("type") == "error":
                raise SandboxUnavailableError(f"sandbox server could not start: {header.get('message')}")
            self.info = header
        return self.info

    def execute(self, code: bytes, *, timeout_s: float, grace_s: float) -> tuple[dict, bytes]:
        deadline = time.monotonic() + timeout_s + grace_s
        self.child_pid = self.workdir = None
        body = json.dumps({"timeout_s": timeout_s}).encode()
        try:
            # The server acknowledges within milliseconds; a silent one is hung (e.g. stopped) and the call can
            # be retried elsewhere, so do not wait for the whole call budget.
            ack_deadline = min(deadline, time.monotonic() + grace_s)
            _write_all(self._in, _worker._HEADER.pack(len(body), len(code)) + body + code, ack_deadline)
            started = _read_frame(self._out, ack_deadline, self._max_frame)
            if started is not None and started[0].get("type") == "result":
                return started  # the server failed before forking and says why (setup_error)
            if started is None or started[0].get("type") != "started":
                raise _ServerFailure(f"sandbox server {self.pid} died before starting the snippet",
                                     started=False, hung=False)
            self.child_pid = int(started[0]["pid"])
            self.workdir = str(started[0]["workdir"])
            result = _read_frame(self._out, deadline, self._max_frame)
        except (BrokenPipeError, ConnectionResetError):
            raise _ServerFailure(f"sandbox server {self.pid} is gone", started=self.child_pid is not None,
                                 hung=False) from None
        except TimeoutError:
            raise _ServerFailure(f"sandbox server {self.pid} did not answer within {timeout_s + grace_s:.1f} s",
                                 started=self.child_pid is not None, hung=True) from None
        except ValueError as exc:
            raise _ServerFailure(f"sandbox server {self.pid}: {exc}", started=True, hung=False) from None
        if result is None or result[0].get("type") != "result":
            raise _ServerFailure(f"sandbox server {self.pid} died while running the snippet", started=True,
                                 hung=False)
        return result

    def close(self, *, wait_s: float = 2.0) -> None:
        """Polite stop: EOF on stdin makes the server exit after its current call."""
        try:
            self.proc.stdin.close()  # type: ignore[union-attr]
        except OSError:
            pass
        try:
            self.proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            self.kill()
        self._close_pipes()

    def kill(self) -> None:
        """Hard stop, plus every process the server's snippet left (uid sweep as root, else its group)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except OSError:
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            log.warning("sandbox server %d did not die after SIGKILL", self.proc.pid)
        info = self.info or {}
        if info.get("uid") is not None:
            subprocess.run([sys.executable, "-I", str(WORKER_PATH), "--sweep", str(info["uid"])],
                           env=_SERVER_ENV, timeout=30, check=False)
        elif self.child_pid is not None:
            try:
                os.killpg(self.child_pid, signal.SIGKILL)
            except OSError:
                pass
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
        self._close_pipes()

    def _close_pipes(self) -> None:
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()  # type: ignore[union-attr]
            except OSError:
                pass


# ------------------------------------------------------------------------------------------------ the pool
class _Pool:
    """Warm fork servers shared by threads. Holds no reference to the PythonSandbox (for weakref.finalize)."""

    def __init__(self, *, python: str, config: dict, prestarted: int, start_timeout_s: float) -> None:
        self.python = python
        self.config = config
        self.prestarted = prestarted
        self.start_timeout_s = start_timeout_s
        self.lock = threading.Lock()
        self.idle: list[_Server] = []
        self.busy: set[_Server] = set()
        self.peak = 0
        self.closed = False

    def spawn(self) -> _Server:
        return _Server(python=self.python, config=self.config, work_root=self.config["work_root"],
                       start_timeout_s=self.start_timeout_s)

    def fill(self) -> int:
        """Drop idle servers that died, top the idle set up to `prestarted`. Returns how many died."""
        with self.lock:
            dead = [s for s in self.idle if not s.alive()]
            self.idle = [s for s in self.idle if s not in dead]
            while not self.closed and len(self.idle) < self.prestarted:
                self.idle.append(self.spawn())
        for server in dead:
            server.kill()
        return len(dead)

    def acquire(self) -> _Server:
        for _ in range(3):
            dead: list[_Server] = []
            with self.lock:
                if self.closed:
                    raise RuntimeError("PythonSandbox is closed")
                server = None
                while self.idle:
                    cand = self.idle.pop()
                    if cand.alive():
                        server = cand
                        break
                    dead.append(cand)
                if server is None:
                    server = self.spawn()
                self.busy.add(server)
                self.peak = max(self.peak, len(self.busy))
            for d in dead:
                d.kill()
            try:
                server.ensure_ready()
                return server
            except _ServerFailure as exc:
                log.warning("%s; replacing it", exc)
                self.discard(server)
            except SandboxUnavailableError:
                self.discard(server, refill=False)
                raise
        raise SandboxUnavailableError("sandbox servers keep failing to start (see the log for why)")

    def release(self, server: _Server) -> None:
        with self.lock:
            self.busy.discard(server)
            cap = 0 if self.prestarted == 0 else max(self.prestarted, self.peak)
            keep = not self.closed and len(self.idle) < cap
            if keep:
                self.idle.append(server)
            remove_root = self.closed and not self.busy
        if not keep:
            server.close()
        if remove_root:
            self._remove_root()

    def discard(self, server: _Server, *, refill: bool = True) -> None:
        """Kill a failed server (and its leftovers) and start a replacement (it warms up in the background)."""
        server.kill()
        with self.lock:
            self.busy.discard(server)
            remove_root = self.closed and not self.busy
        if remove_root:
            self._remove_root()
        elif refill:
            self.fill()

    def servers(self) -> list[_Server]:
        with self.lock:
            return list(self.idle) + list(self.busy)

    def take_idle(self) -> list[_Server]:
        with self.lock:
            taken, self.idle = self.idle, []
            self.busy.update(taken)
            return taken

    def close(self) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
            idle, self.idle = self.idle, []
            remove_root = not self.busy
        for server in idle:
            server.close()
        if remove_root:
            self._remove_root()

    def _remove_root(self) -> None:
        shutil.rmtree(self.config["work_root"], ignore_errors=True)


# ------------------------------------------------------------------------------------------------ public API
def _require(ok: bool, name: str, value: Any, expected: str) -> None:
    if not ok:
        raise ValueError(f"PythonSandbox({name}={value!r}): expected {expected}")


class PythonSandbox:
    """Pool of pre-started fork servers running snippets under limits. Thread-safe; a context manager.

    Args (keyword-only):
        timeout_s: wall-clock limit per call (overridable per `run`).
        cpu_time_s: RLIMIT_CPU per process (soft; hard = soft + 1).
        memory_mb: RLIMIT_AS per process.
        max_processes: RLIMIT_NPROC (processes + threads) of the snippet's uid.
        max_file_mb: RLIMIT_FSIZE; also bounds nothing else.
        max_open_files: RLIMIT_NOFILE.
        max_output_chars: characters kept per stream (stdout, stderr) before "[truncated]".
        isolate_network: False disables network isolation (network_mode is then ignored).
        prestarted: warm fork servers kept ready; 0 = start one per call (cold, slow).
        network_mode: a `NetworkMode` value (default "auto").
        output_kill_bytes: a snippet printing more than this (stdout + stderr) is killed.
        preload: modules imported once in each fork server (e.g. ("numpy",)) so snippets get them for free.
        tmpfs_mb: size of the private /tmp, /var/tmp, /dev/shm (default 4 * max_file_mb).
        uid_base, uid_count: uids the children run as when the host is root (one per fork server).
        start_timeout_s: how long a fork server may take to start.
        grace_s: extra host-side time beyond timeout_s before a server is declared hung.
        total_memory_mb: cap on the memory of all of a snippet's processes together (default: memory_mb),
            through a per-call cgroup (v2, or v1 where that is what the host mounts). Where no writable
            memory cgroup exists, only the per-process RLIMIT_AS applies; `ready()` reports which
            (`memory_cap`: "cgroup2" | "cgroup1" | "rlimit").
        pid_namespace: give each call its own PID namespace and /proc where the host allows it (root with
            mount isolation); `ready()` reports whether it did (`pid_namespace`: true | false).
    """

    def __init__(
        self,
        *,
        timeout_s: float = 5.0,
        cpu_time_s: int = 5,
        memory_mb: int = 512,
        max_processes: int = 16,
        max_file_mb: int = 16,
        max_open_files: int = 64,
        max_output_chars: int = 2000,
        isolate_network: bool = True,
        prestarted: int = 2,
        network_mode: str | NetworkMode = NetworkMode.AUTO,
        output_kill_bytes: int = 8 << 20,
        preload: Iterable[str] = (),
        tmpfs_mb: int | None = None,
        uid_base: int = DEFAULT_UID_BASE,
        uid_count: int = DEFAULT_UID_COUNT,
        start_timeout_s: float = 60.0,
        grace_s: float = 3.0,
        total_memory_mb: int | None = None,
        pid_namespace: bool = True,
    ) -> None:
        _require(timeout_s > 0, "timeout_s", timeout_s, "> 0 seconds")
        _require(cpu_time_s >= 1, "cpu_time_s", cpu_time_s, ">= 1 second (integer)")
        _require(memory_mb >= 32, "memory_mb", memory_mb, ">= 32 (a Python process needs ~20 MB of address space)")
        _require(max_processes >= 1, "max_processes", max_processes, ">= 1")
        _require(max_file_mb >= 1, "max_file_mb", max_file_mb, ">= 1")
        _require(max_open_files >= 8, "max_open_files", max_open_files, ">= 8")
        _require(max_output_chars >= 1, "max_output_chars", max_output_chars, ">= 1")
        _require(prestarted >= 0, "prestarted", prestarted, ">= 0")
        _require(output_kill_bytes >= 1024, "output_kill_bytes", output_kill_bytes, ">= 1024")
        _require(0 <= uid_base and uid_count >= 1, "uid_base/uid_count", (uid_base, uid_count), "uid_base >= 0, "
                 "uid_count >= 1")
        try:
            mode = NetworkMode(network_mode)
        except ValueError:
            raise ValueError(f"PythonSandbox(network_mode={network_mode!r}): expected one of "
                             f"{[m.value for m in NetworkMode]}") from None
        if isolate_network and mode == NetworkMode.NONE:
            raise ValueError("PythonSandbox(network_mode='none') contradicts isolate_network=True; "
                             "set isolate_network=False to allow network access")
        if not isolate_network:
            mode = NetworkMode.NONE
        self.timeout_s = float(timeout_s)
        self.cpu_time_s = int(cpu_time_s)
        self.max_output_chars = int(max_output_chars)
        self.network_mode = mode
        self.grace_s = float(grace_s)
        self.work_root = tempfile.mkdtemp(prefix="tepo_sandbox_")
        os.chmod(self.work_root, 0o711)  # the sandbox uid may enter its own run dir, not list the others
        config = {
            "work_root": self.work_root,
            "lock_dir": os.path.join(tempfile.gettempdir(), "tepo_sandbox_uids"),
            "uid_base": int(uid_base), "uid_count": int(uid_count),
            "network_mode": mode.value,
            "cpu_time_s": int(cpu_time_s), "memory_mb": int(memory_mb), "max_processes": int(max_processes),
            "max_file_mb": int(max_file_mb), "max_open_files": int(max_open_files),
            "keep_bytes": 4 * int(max_output_chars) + 4, "kill_bytes": int(output_kill_bytes),
            "tmpfs_mb": int(tmpfs_mb if tmpfs_mb is not None else 4 * max_file_mb),
            "preload": list(preload),
            "total_memory_mb": int(total_memory_mb if total_memory_mb is not None else memory_mb),
            "protected_pids": sorted({os.getpid(), os.getpgrp()}),
            "pid_namespace": bool(pid_namespace),
        }
        self._pool = _Pool(python=sys.executable, config=config, prestarted=int(prestarted),
                           start_timeout_s=float(start_timeout_s))
        self._finalizer = weakref.finalize(self, self._pool.close)
        self._pool.fill()
        if prestarted:  # fail fast (bad network_mode for this machine, broken preload, ...)
            try:
                server = self._pool.acquire()
            except BaseException:
                self.close()
                raise
            self._pool.release(server)

    @classmethod
    def from_config(cls, cfg: Any, **overrides: Any) -> "PythonSandbox":
        """Build from a `tepo_ray.config.PythonToolConfig` (dataclass or omegaconf node, i.e. cfg.tools.python)."""
        kwargs = dict(
            timeout_s=cfg.call_timeout_s, cpu_time_s=cfg.cpu_time_s, memory_mb=cfg.memory_mb,
            max_processes=cfg.max_processes, max_file_mb=cfg.max_file_mb, max_open_files=cfg.max_open_files,
            max_output_chars=cfg.max_output_chars, isolate_network=cfg.isolate_network,
            prestarted=cfg.prestarted, network_mode=getattr(cfg, "network_mode", NetworkMode.AUTO.value),
            pid_namespace=getattr(cfg, "pid_namespace", True),
        )
        kwargs.update(overrides)
        return cls(**kwargs)

    # ------------------------------------------------------------------------------------------- calls
    def run(self, code: str, *, timeout_s: float | None = None) -> SandboxResult:
        """Execute `code` in a fresh confined process; never raises for anything the code does."""
        if not isinstance(code, str):
            raise TypeError(f"PythonSandbox.run(code=...): expected str, got {type(code).__name__}")
        timeout = self.timeout_s if timeout_s is None else float(timeout_s)
        _require(timeout > 0, "run.timeout_s", timeout_s, "> 0 seconds")
        payload = code.encode("utf-8", "surrogatepass")
        t0 = time.monotonic()
        for attempt in (0, 1):
            server = self._pool.acquire()
            try:
                header, data = server.execute(payload, timeout_s=timeout, grace_s=self.grace_s)
            except _ServerFailure as exc:
                log.warning("%s; replacing it", exc)
                self._pool.discard(server)
                if not exc.started and attempt == 0:
                    continue
                return SandboxResult(stdout="", stderr="", exit_code=None, timed_out=exc.hung, truncated=False,
                                     duration_s=time.monotonic() - t0, error=SandboxErrorKind.SANDBOX_FAILURE,
                                     detail=str(exc))
            self._pool.release(server)
            return self._result(header, data)
        raise AssertionError("unreachable")

    def _result(self, header: dict, data: bytes) -> SandboxResult:
        n_oh, n_ot, n_eh, n_et = header["parts"]
        cuts = [0, n_oh, n_oh + n_ot, n_oh + n_ot + n_eh, n_oh + n_ot + n_eh + n_et]
        oh, ot, eh, et = (data[cuts[i]:cuts[i + 1]] for i in range(4))
        stdout, t_out = _decode_stream(oh, ot, header["stdout_total"], self.max_output_chars)
        stderr, t_err = _decode_stream(eh, et, header["stderr_total"], self.max_output_chars)
        kind = self._classify(header)
        exit_code = header["exit_code"]
        if header["timed_out"] or header["output_limit"] or header["setup_error"]:
            exit_code = None
        detail = None
        if header["setup_error"]:
            detail = f"sandbox setup failed in the child: {header['setup_error']}"
            log.warning(detail)
        return SandboxResult(stdout=stdout, stderr=stderr, exit_code=exit_code, timed_out=bool(header["timed_out"]),
                             truncated=t_out or t_err, duration_s=float(header["duration_s"]), error=kind,
                             detail=detail)

    def _classify(self, header: dict) -> Optional[SandboxErrorKind]:
        if header["setup_error"]:
            return SandboxErrorKind.SANDBOX_FAILURE
        if header["timed_out"]:
            return SandboxErrorKind.TIMEOUT
        if header["output_limit"]:
            return SandboxErrorKind.OUTPUT_LIMIT
        code = int(header["exit_code"])
        status = header["status"] or ""
        if header.get("memory_oom") and code != 0:
            return SandboxErrorKind.MEMORY  # the cgroup's total-memory cap OOM-killed a process
        if code < 0:
            sig = -code
            if sig == signal.SIGXCPU or (sig == signal.SIGKILL and header["duration_s"] >= self.cpu_time_s):
                return SandboxErrorKind.CPU_TIME
            return SandboxErrorKind.CRASHED if sig in _CRASH_SIGNALS else SandboxErrorKind.KILLED
        if status == "syntax_error":
            return SandboxErrorKind.SYNTAX_ERROR
        if status == "exception:MemoryError":
            return SandboxErrorKind.MEMORY
        if status.startswith("exception:"):
            return SandboxErrorKind.EXCEPTION
        return SandboxErrorKind.NONZERO_EXIT if code != 0 else None

    # ------------------------------------------------------------------------------------------- admin
    def ready(self) -> list[dict]:
        """Start (if needed) and describe the idle warm servers: pid, uid, network, mount_isolation, seccomp,
        memory_cap, pid_namespace."""
        out = []
        for server in self._pool.take_idle():
            try:
                out.append(dict(server.ensure_ready()))
            except _ServerFailure as exc:
                log.warning("%s; replacing it", exc)
                self._pool.discard(server)
                continue
            self._pool.release(server)
        return out

    def replace_dead_workers(self) -> int:
        """Health check: replace idle fork servers that died. Returns how many were replaced."""
        return self._pool.fill()

    def worker_pids(self) -> list[int]:
        """Pids of the fork-server processes currently held by this sandbox (idle and busy)."""
        return [s.pid for s in self._pool.servers()]

    def close(self) -> None:
        """Stop all fork servers and remove the work root (calls in flight finish first)."""
        self._finalizer()

    def __enter__(self) -> "PythonSandbox":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def run_code(code: str, *, timeout_s: float = 5.0, **limits: Any) -> SandboxResult:
    """One-off convenience: a cold sandbox for one snippet (use a `PythonSandbox` for repeated calls)."""
    with PythonSandbox(timeout_s=timeout_s, prestarted=0, **limits) as sandbox:
        return sandbox.run(code)
