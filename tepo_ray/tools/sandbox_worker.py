"""Fork server of the Python sandbox: one pre-started interpreter that forks a fresh, confined child per snippet.

This file runs as its own process (``python -I sandbox_worker.py``, started with a minimal environment) and
imports only the standard library, so it holds no host secret that a forked child could read from memory.
Light stdlib modules (math, re, json, ...) and `preload` modules are imported once here, then `gc.freeze()`
keeps children from copy-on-write-copying that heap. The host side is
`tepo_ray.tools.python_sandbox.PythonSandbox`; the protocol between the two is private.

Per snippet (``_Server.run``)::

    server (warm, single-threaded, subreaper)
      └─ fork ─► child: setsid · stdio = pipes · close other fds · [root: mount + IPC namespace: private tmpfs
                 /tmp /var/tmp /dev/shm, read-only /, work dir bind-mounted rw at its host path, dirs the uid
                 could not enter but holding the interpreter (a pyenv under /root) replaced by a tmpfs with just
                 the interpreter bind-mounted] · chdir(work dir) · scrubbed env · rlimits (CPU, AS, NPROC, FSIZE,
                 NOFILE, CORE=0) · [root: setuid/setgid to a uid owned by this server alone] · no_new_privs ·
                 [seccomp filter] · [audit hook] · exec(code)
    server: poll(stdout, stderr, status pipe, pidfd) until exit / wall deadline / output kill limit,
            keep a bounded head+tail of each stream, kill + reap every descendant, remove the work dir.

Why each piece:
* The server is a subreaper (PR_SET_CHILD_SUBREAPER): every process a snippet creates stays in the server's
  subtree, so "no children left" (waitpid -> ECHILD) proves nothing survived a call. Fork bombs are capped by
  RLIMIT_NPROC, which the kernel only enforces for non-root uids: as root the child drops to a uid that this
  server holds exclusively (flock on ``<tmp>/tepo_sandbox_uids/<uid>.lock``), so the cap is per call and a
  snippet cannot signal or read other processes (host env secrets in /proc/<pid>/environ included).
* Network: ``namespace`` = the server unshares a network namespace once at start (loopback down: connect gives
  "Network is unreachable"); ``seccomp`` = kernel filter in the child: socket() for anything but AF_UNIX and
  io_uring are refused (works without root, survives exec); ``audit`` = a `sys.addaudithook` guard refusing
  socket creation/connect/DNS, ctypes loading and new-program spawning (pure Python, best effort only).
* Without root the child runs as the host's user: a seccomp filter additionally refuses kill()/tgkill()/
  pidfd_open() aimed at the host or server and ptrace(); /proc/<host>/environ stays readable. Run the tool
  pool as root (e.g. in a container) for full isolation.

Wire format (both directions): ``>II`` (json_len, payload_len), UTF-8 JSON header, raw payload bytes.
"""

from __future__ import annotations

import ast
import atexit
import builtins
import ctypes
import errno
import fcntl
import gc
import io
import json
import linecache
import os
import random
import resource
import select
import shutil
import signal
import struct
import sys
import tempfile
import time
import traceback
import types

CODE_FILENAME = "<code>"
_HEADER = struct.Struct(">II")
_MAX_REQUEST_BYTES = 64 << 20
_SETUP_FAIL_EXIT = 125
_STATUS_FD = 3
_TB_FULL_DEPTH = 2000  # tracebacks deeper than this show only the innermost _TB_DEEP_FRAMES frames
_TB_DEEP_FRAMES = 50

# ---------------------------------------------------------------------------------------------- libc helpers
_LIBC = ctypes.CDLL(None, use_errno=True)
_LIBC.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
_LIBC.unshare.argtypes = [ctypes.c_int]
_LIBC.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_LIBC.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]

CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
CLONE_NEWNET = 0x40000000
CLONE_NEWPID = 0x20000000
MS_NOEXEC = 8
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 32, 4096, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_SECCOMP, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 22, 36, 38
SECCOMP_MODE_FILTER = 2


def _libc_call(name: str, *args) -> None:
    if getattr(_LIBC, name)(*args) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{name}: {os.strerror(err)}")


# ---------------------------------------------------------------------------------------------- cgroups
_CG_ROOT = "/sys/fs/cgroup"


def detect_memory_cgroup(root: str = _CG_ROOT) -> tuple[str, str | None]:
    """(mode, parent dir) for a total-memory cap over all processes of one snippet.

    "cgroup2": a unified hierarchy whose root delegates the memory controller; "cgroup1": a writable v1
    memory controller (DESIGN.md section 5: this is what these machines have); "rlimit": neither (not
    root, read-only cgroupfs), so memory is bounded per process only (RLIMIT_AS).
    """
    try:
        with open(os.path.join(root, "cgroup.subtree_control")) as fh:
            v2 = "memory" in fh.read().split()
        if v2 and os.access(root, os.W_OK):
            return "cgroup2", root
    except OSError:
        pass
    v1 = os.path.join(root, "memory")
    if os.path.isfile(os.path.join(v1, "memory.limit_in_bytes")) and os.access(v1, os.W_OK):
        return "cgroup1", v1
    return "rlimit", None


def sweep_stale_cgroups(parent: str) -> int:
    """Remove empty per-call cgroups left by fork servers that were killed mid-call (pid gone)."""
    removed = 0
    for entry in os.scandir(parent):
        parts = entry.name.split("_")
        if not (entry.name.startswith("tepo_sandbox_") and len(parts) == 4 and parts[2].isdigit()):
            continue
        if os.path.exists(f"/proc/{parts[2]}"):
            continue
        try:
            os.rmdir(entry.path)
            removed += 1
        except OSError:
            pass
    return removed


class SnippetCgroup:
    """One child cgroup per snippet call with a memory limit on all its processes together."""

    def __init__(self, mode: str, parent: str, name: str, limit_bytes: int) -> None:
        self.mode, self.path = mode, os.path.join(parent, name)
        os.mkdir(self.path)
        try:
            if mode == "cgroup2":
                self._write("memory.max", str(limit_bytes))
                self._write("memory.swap.max", "0", optional=True)
            else:
                self._write("memory.limit_in_bytes", str(limit_bytes))
                self._write("memory.memsw.limit_in_bytes", str(limit_bytes), optional=True)
        except BaseException:
            self.remove()
            raise

    def _write(self, name: str, value: str, *, optional: bool = False) -> None:
        try:
            with open(os.path.join(self.path, name), "w") as fh:
                fh.write(value)
        except OSError:
            if not optional:
                raise

    def enter(self) -> None:
        """Move the calling process (the snippet child, before it runs code) into the cgroup."""
        self._write("cgroup.procs", str(os.getpid()))

    def oom_killed(self) -> bool:
        try:
            # v2: memory.events; v1: memory.oom_control (memory.failcnt stays 0 on some v1 kernels)
            name = "memory.events" if self.mode == "cgroup2" else "memory.oom_control"
            with open(os.path.join(self.path, name)) as fh:
                return any(ln.split()[0] == "oom_kill" and int(ln.split()[1]) > 0 for ln in fh if ln.strip())
        except (OSError, ValueError, IndexError):
            return False

    def remove(self) -> None:
        for _ in range(50):  # processes just killed may take a moment to leave
            try:
                os.rmdir(self.path)
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.01)


def _unshare(flags: int) -> None:
    _libc_call("unshare", flags)


def _setns(fd: int, nstype: int) -> None:
    _libc_call("setns", fd, nstype)


def _mount(src: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    if _LIBC.mount(enc(src), enc(target), enc(fstype), flags, enc(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {target}: {os.strerror(err)}")


def _prctl(option: int, arg2: int = 0, arg3: int = 0) -> None:
    _libc_call("prctl", option, arg2, arg3, 0, 0)


# ---------------------------------------------------------------------------------------------- seccomp
class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


# name -> (AUDIT_ARCH, {syscall: nr})
_SECCOMP_ARCHES = {
    "x86_64": (0xC000003E, dict(socket=41, io_uring_setup=425, kill=62, tkill=200, tgkill=234, pidfd_open=434,
                                ptrace=101, process_vm_readv=310, process_vm_writev=311)),
    "aarch64": (0xC00000B7, dict(socket=198, io_uring_setup=425, kill=129, tkill=130, tgkill=131, pidfd_open=434,
                                 ptrace=117, process_vm_readv=270, process_vm_writev=271)),
}
_BPF_LD_ABS, _BPF_JEQ, _BPF_JGE, _BPF_RET = 0x20, 0x15, 0x35, 0x06
_RET_ALLOW, _RET_EPERM = 0x7FFF0000, 0x00050000 | errno.EPERM


def seccomp_supported() -> bool:
    return os.uname().machine in _SECCOMP_ARCHES and hasattr(_LIBC, "prctl")


def build_seccomp_filter(*, block_network: bool, protected_pids: list[int]) -> tuple[_SockFprog, ctypes.Array]:
    """Assemble the classic-BPF program. Returns (fprog, instruction array); keep both alive.

    Rules (native arch only; every syscall of a foreign ABI such as i386 or x32 gets EPERM):
      block_network: socket(domain != AF_UNIX) and io_uring_setup -> EPERM.
      protected_pids: kill/tkill/tgkill/pidfd_open whose first argument (low 32 bits) is -1 or +-pid -> EPERM;
                      ptrace and process_vm_readv/writev -> EPERM.
    """
    machine = os.uname().machine
    arch, nr = _SECCOMP_ARCHES[machine]
    prog: list[tuple] = []  # (code, jt_label | 0, jf_label | 0, k); labels resolved below
    labels: dict[str, int] = {}

    def label(name: str) -> None:
        labels[name] = len(prog)

    def jeq(k: int, target: str) -> None:
        prog.append((_BPF_JEQ, target, None, k))

    prog.append((_BPF_LD_ABS, None, None, 4))  # seccomp_data.arch
    prog.append((_BPF_JEQ, None, "deny", arch))
    prog.append((_BPF_LD_ABS, None, None, 0))  # seccomp_data.nr
    if machine == "x86_64":
        prog.append((_BPF_JGE, "deny", None, 0x40000000))  # x32 ABI
    if block_network:
        jeq(nr["io_uring_setup"], "deny")
        jeq(nr["socket"], "socket")
    if protected_pids:
        for name in ("ptrace", "process_vm_readv", "process_vm_writev"):
            jeq(nr[name], "deny")
        for name in ("kill", "tkill", "tgkill", "pidfd_open"):
            jeq(nr[name], "pidcheck")
    prog.append((_BPF_RET, None, None, _RET_ALLOW))
    if block_network:
        label("socket")
        prog.append((_BPF_LD_ABS, None, None, 16))  # args[0], low 32 bits (little endian)
        jeq(socket_af_unix(), "allow")
        prog.append((_BPF_RET, None, None, _RET_EPERM))
    if protected_pids:
        label("pidcheck")
        prog.append((_BPF_LD_ABS, None, None, 16))
        values = {0xFFFFFFFF}
        for pid in protected_pids:
            values |= {pid & 0xFFFFFFFF, (-pid) & 0xFFFFFFFF}
        for v in sorted(values):
            jeq(v, "deny")
        prog.append((_BPF_RET, None, None, _RET_ALLOW))
    label("allow")
    prog.append((_BPF_RET, None, None, _RET_ALLOW))
    label("deny")
    prog.append((_BPF_RET, None, None, _RET_EPERM))

    arr = (_SockFilter * len(prog))()
    for i, (code, jt, jf, k) in enumerate(prog):
        rel = lambda lab: 0 if lab is None else labels[lab] - i - 1  # noqa: E731
        jt_off, jf_off = rel(jt), rel(jf)
        if not (0 <= jt_off < 256 and 0 <= jf_off < 256):
            raise AssertionError("seccomp jump out of range")
        arr[i] = _SockFilter(code, jt_off, jf_off, k)
    return _SockFprog(len(prog), arr), arr


def socket_af_unix() -> int:
    return 1  # AF_UNIX on Linux; `socket` is not imported here to keep the server small


def _install_seccomp(fprog: _SockFprog) -> None:
    _libc_call("prctl", PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fprog), 0, 0)


# ---------------------------------------------------------------------------------------------- audit guard
_AUDIT_BLOCKED = frozenset({
    "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyname_ex", "socket.gethostbyaddr",
    "socket.getnameinfo", "ctypes.dlopen", "ctypes.dlsym", "ctypes.dlsym/handle", "os.exec", "os.posix_spawn",
    "os.spawn", "os.system", "subprocess.Popen", "gc.get_objects", "gc.get_referrers", "gc.get_referents",
})
_AUDIT_SOCKET_USE = frozenset({"socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg"})


def _audit_guard(event: str, args: tuple) -> None:
    """Best-effort, pure-Python network block (network_mode="audit"); cannot be removed once installed."""
    if event == "socket.__new__":
        if args[1] != socket_af_unix():
            raise PermissionError(errno.EPERM, "network access is disabled in this sandbox")
    elif event in _AUDIT_SOCKET_USE:
        if getattr(args[0], "family", None) != socket_af_unix():
            raise PermissionError(errno.EPERM, "network access is disabled in this sandbox")
    elif event in _AUDIT_BLOCKED:
        raise PermissionError(errno.EPERM, f"{event} is disabled in this sandbox (network_mode=audit)")


# ---------------------------------------------------------------------------------------------- framing
def write_frame(fd: int, header: dict, payload: bytes = b"") -> None:
    body = json.dumps(header).encode()
    data = memoryview(_HEADER.pack(len(body), len(payload)) + body + payload)
    while data:
        n = os.write(fd, data)
        data = data[n:]


def _read_exact(fd: int, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def read_frame(fd: int) -> tuple[dict, bytes] | None:
    head = _read_exact(fd, _HEADER.size)
    if head is None:
        return None
    jlen, plen = _HEADER.unpack(head)
    if jlen + plen > _MAX_REQUEST_BYTES:
        raise ValueError(f"frame of {jlen + plen} bytes exceeds {_MAX_REQUEST_BYTES}")
    body = _read_exact(fd, jlen)
    payload = _read_exact(fd, plen) if plen else b""
    if body is None or payload is None:
        return None
    return json.loads(body), payload


# ---------------------------------------------------------------------------------------------- processes
def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:  # kernel without CONFIG_PROC_CHILDREN: scan ppids
        out = []
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                try:
                    with open(f"{entry.path}/stat", "rb") as f:
                        if int(f.read().rsplit(b")", 1)[1].split()[1]) == pid:
                            out.append(int(entry.name))
                except (OSError, ValueError, IndexError):
                    pass
        return out


def _uid_processes(uid: int) -> list[int]:
    """Pids whose real uid is `uid` (from /proc/<pid>/status; /proc/<pid> ownership lies for non-dumpable tasks)."""
    out = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"{entry.path}/status", "rb") as f:
                    for line in f:
                        if line.startswith(b"Uid:"):
                            if int(line.split()[1]) == uid:
                                out.append(int(entry.name))
                            break
            except (OSError, ValueError, IndexError):
                pass
    return out


def sweep_uid(uid: int, *, deadline_s: float = 5.0) -> bool:
    """SIGKILL every process whose real uid is `uid` (root only). True when none is left.

    Used at server start (leftovers of a crashed server that owned the same uid) and by the host after a server
    crash (``--sweep UID``). A helper forked per round drops to `uid` and calls kill(-1, SIGKILL), which reaches
    exactly the processes of that uid; zombies are left for their parents to reap.
    """
    deadline = time.monotonic() + deadline_s
    while True:
        live = [p for p in _uid_processes(uid) if not _is_zombie(p)]
        if not live:
            return True
        if time.monotonic() > deadline:
            return False
        helper = os.fork()
        if helper == 0:
            try:
                os.setgroups([])
                os.setresgid(uid, uid, uid)
                os.setresuid(uid, uid, uid)
                os.kill(-1, signal.SIGKILL)
            finally:
                os._exit(0)
        os.waitpid(helper, 0)
        _reap_nohang()
        time.sleep(0.005)


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X")
    except (OSError, IndexError):
        return True


def _reap_nohang() -> bool:
    """Reap exited children. True when the server has no child process at all."""
    try:
        while True:
            pid, _ = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                return False
    except ChildProcessError:
        return True


def _kill_subtree(root: int) -> None:
    """SIGKILL a process and everything below it (snapshot; the caller repeats until no child is left)."""
    todo, seen = [root], set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        todo.extend(_children(pid))
    for pid in seen:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def _interpreter_paths() -> dict[str, list[str]]:
    """Interpreter dirs (prefixes, sys.path, the executable's dir) behind a directory that "others" cannot enter.

    Returns {outermost blocking dir: [topmost interpreter dirs below it]}; empty on a normal install.
    """
    want = {sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix,
            os.path.dirname(os.path.realpath(sys.executable))}
    want |= {p for p in sys.path if p and os.path.isdir(p)}
    want = {os.path.realpath(p) for p in want if os.path.isdir(p)}
    top = sorted(p for p in want if not any(p != q and p.startswith(q.rstrip("/") + "/") for q in want))
    out: dict[str, list[str]] = {}
    for path in top:
        cur = ""
        for part in path.strip("/").split("/"):
            cur += "/" + part
            if cur == path:
                break  # the dir itself is bind-mounted as is
            if not os.stat(cur).st_mode & 0o001:
                out.setdefault(cur, []).append(path)
                break
    return out


# ---------------------------------------------------------------------------------------------- output capture
class _Capture:
    """Bounded head + tail of one stream: the first `keep//2` bytes and the last `keep - keep//2` bytes."""

    def __init__(self, keep: int) -> None:
        self.head_cap = keep // 2
        self.tail_cap = keep - self.head_cap
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0

    def add(self, data: bytes) -> None:
        self.total += len(data)
        room = self.head_cap - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        if data:
            self.tail += data
            if len(self.tail) > self.tail_cap:
                del self.tail[: len(self.tail) - self.tail_cap]


# ---------------------------------------------------------------------------------------------- the server
class SetupError(RuntimeError):
    """The server cannot provide what the host asked for (message says what and how to fix it)."""


_SERVER_PRELOAD = ("math", "re", "json", "itertools", "functools", "collections", "fractions", "decimal",
                   "statistics", "string", "datetime", "heapq", "bisect", "operator")


class _Server:
    def __init__(self, cfg: dict) -> None:
        self.cfg = cfg
        self.pid = os.getpid()
        self.is_root = os.geteuid() == 0
        self.work_root = cfg["work_root"]
        self.uid: int | None = None
        self._uid_lock_fd: int | None = None
        _prctl(PR_SET_CHILD_SUBREAPER, 1)
        if self.is_root:
            self.uid = self._lock_uid(cfg["uid_base"], cfg["uid_count"], cfg["lock_dir"])
            sweep_uid(self.uid)
        self.network = self._setup_network(cfg["network_mode"])
        self.exposed = _interpreter_paths()  # {dir the uid cannot enter: [interpreter paths below it]}
        self.mount_isolation = self.is_root and self._probe_mounts()
        self._pidns_fd: int | None = None  # this server's own PID namespace, to return to after each fork
        self.pid_namespace = bool(self.mount_isolation and cfg.get("pid_namespace", True)
                                  and self._probe_pid_namespace())
        self.memory_cap, self._cg_parent = ("rlimit", None)
        if cfg.get("total_memory_mb"):
            self.memory_cap, self._cg_parent = detect_memory_cgroup()
            if self._cg_parent is not None:
                sweep_stale_cgroups(self._cg_parent)
        self._calls = 0
        if self.is_root:
            self._check_interpreter_readable()
        protected = [] if self.is_root else sorted({int(p) for p in cfg["protected_pids"]} | {self.pid})
        want_seccomp = self.network == "seccomp" or bool(protected)
        self.seccomp = None
        if want_seccomp and seccomp_supported():
            self.seccomp = build_seccomp_filter(block_network=self.network == "seccomp", protected_pids=protected)
        for name in list(_SERVER_PRELOAD) + list(cfg["preload"]):
            try:
                __import__(name)
            except Exception as exc:  # noqa: BLE001 - reported to the host verbatim
                raise SetupError(f"preload module {name!r} failed to import: {type(exc).__name__}: {exc}") from None
        self.path_dirs = os.pathsep.join([os.path.dirname(sys.executable), "/usr/local/bin", "/usr/bin", "/bin"])
        # Everything loaded so far is shared copy-on-write with every child: keep the collector from walking
        # (and so copying) those pages in each child.
        gc.collect()
        gc.freeze()

    # ---------------------------------------------------------------- setup
    def _lock_uid(self, base: int, count: int, lock_dir: str) -> int:
        os.makedirs(lock_dir, mode=0o700, exist_ok=True)
        st = os.lstat(lock_dir)
        if st.st_uid != 0 or st.st_mode & 0o022 or not os.path.isdir(lock_dir):
            raise SetupError(f"uid lock dir {lock_dir} must be a root-owned directory not writable by others")
        start = random.randrange(count)
        for i in range(count):
            uid = base + (start + i) % count
            fd = os.open(os.path.join(lock_dir, f"{uid}.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            self._uid_lock_fd = fd
            return uid
        raise SetupError(f"all {count} sandbox uids from {base} are in use; raise uid_count or close sandboxes")

    def _setup_network(self, mode: str) -> str:
        if mode == "none":
            return "none"
        if mode in ("namespace", "auto"):
            try:
                _unshare(CLONE_NEWNET)
                return "namespace"
            except OSError as exc:
                if mode == "namespace":
                    raise SetupError(
                        f"network_mode='namespace' needs unshare(CLONE_NEWNET) (root / CAP_SYS_ADMIN) and it "
                        f"failed: {exc}; use network_mode='seccomp' or 'auto'") from None
        if mode in ("seccomp", "auto"):
            if seccomp_supported() and self._probe_seccomp():
                return "seccomp"
            if mode == "seccomp":
                raise SetupError(f"network_mode='seccomp' is not available on {os.uname().machine} "
                                 f"(supported: {sorted(_SECCOMP_ARCHES)}); use 'audit' or 'auto'")
        return "audit"

    def _probe_seccomp(self) -> bool:
        prog = build_seccomp_filter(block_network=True, protected_pids=[])
        pid = os.fork()
        if pid == 0:
            try:
                _prctl(PR_SET_NO_NEW_PRIVS, 1)
                _install_seccomp(prog[0])
                os._exit(0)
            except BaseException:  # noqa: BLE001
                os._exit(1)
        return os.waitpid(pid, 0)[1] == 0

    def _probe_mounts(self) -> bool:
        try:
            _unshare(CLONE_NEWNS)  # the server's own namespace: per-call mounts never touch the host's tree
            _mount(None, "/", None, MS_REC | MS_PRIVATE)
        except OSError as exc:
            print(f"tepo sandbox: no mount isolation ({exc})", file=sys.stderr)
            return False
        probe = tempfile.mkdtemp(prefix="probe_", dir=self.work_root)
        try:
            pid = os.fork()
            if pid == 0:
                try:
                    self._isolate_mounts(probe)
                    with open(os.path.join(probe, "ok"), "w"):
                        pass
                    os._exit(0)
                except BaseException as exc:  # noqa: BLE001
                    print(f"tepo sandbox: no mount isolation ({exc})", file=sys.stderr)
                    os._exit(1)
            ok = os.waitpid(pid, 0)[1] == 0 and os.path.exists(os.path.join(probe, "ok"))
        finally:
            shutil.rmtree(probe, ignore_errors=True)
        return ok

    def _probe_pid_namespace(self) -> bool:
        """Can each call get its own PID namespace, with a /proc that shows only that namespace?"""
        try:
            self._pidns_fd = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            print(f"tepo sandbox: no PID namespace ({exc})", file=sys.stderr)
            return False
        ok = self._pid_namespace_works()
        if not ok:
            os.close(self._pidns_fd)
            self._pidns_fd = None
        return ok

    def _pid_namespace_works(self) -> bool:
        probe = tempfile.mkdtemp(prefix="probe_", dir=self.work_root)
        try:
            try:
                pid = self._fork_snippet()
            except OSError as exc:
                print(f"tepo sandbox: no PID namespace ({exc})", file=sys.stderr)
                return False
            if pid == 0:
                try:
                    self._isolate_mounts(probe, new_proc=True)
                    visible = {e for e in os.listdir("/proc") if e.isdigit()}
                    os._exit(0 if os.getpid() == 1 and visible == {"1"} else 1)
                except BaseException as exc:  # noqa: BLE001
                    print(f"tepo sandbox: no PID namespace ({exc})", file=sys.stderr)
                    os._exit(1)
            return os.waitpid(pid, 0)[1] == 0
        finally:
            shutil.rmtree(probe, ignore_errors=True)

    def _fork_snippet(self) -> int:
        """fork(); with a PID namespace the child is pid 1 of a new one (everything in it dies with it)."""
        if self._pidns_fd is None:
            return os.fork()
        _unshare(CLONE_NEWPID)  # applies to the children this process creates next, not to itself
        try:
            pid = os.fork()
        except BaseException:
            _setns(self._pidns_fd, CLONE_NEWPID)
            raise
        if pid != 0:  # back to our own namespace for children, so the next call can unshare a fresh one
            try:
                _setns(self._pidns_fd, CLONE_NEWPID)
            except OSError:
                os.kill(pid, signal.SIGKILL)  # never run a snippet we could not account for
                os.waitpid(pid, 0)
                raise
        return pid

    def _check_interpreter_readable(self) -> None:
        """Root mode: a snippet runs as an unprivileged uid and must still be able to import the stdlib."""
        stdlib = os.path.dirname(os.__file__)
        probe = tempfile.mkdtemp(prefix="probe_", dir=self.work_root)
        os.chown(probe, self.uid, self.uid)
        try:
            pid = os.fork()
            if pid == 0:
                try:
                    if self.mount_isolation:
                        self._isolate_mounts(probe)
                    os.setgroups([])
                    os.setresgid(self.uid, self.uid, self.uid)
                    os.setresuid(self.uid, self.uid, self.uid)
                    os.listdir(stdlib)
                    os._exit(0)
                except BaseException:  # noqa: BLE001
                    os._exit(1)
            ok = os.waitpid(pid, 0)[1] == 0
        finally:
            shutil.rmtree(probe, ignore_errors=True)
        if not ok:
            raise SetupError(
                f"the Python standard library {stdlib} is not readable by the sandbox uid {self.uid} "
                f"(mount isolation: {self.mount_isolation}); install Python world-readable or run the host as "
                f"a non-root user")

    def _isolate_mounts(self, workdir: str, *, new_proc: bool = False) -> None:
        """Child only: private /tmp, /var/tmp, /dev/shm (tmpfs), read-only /, work dir writable at the same path,
        and with `new_proc` (the child is in its own PID namespace) a /proc that shows only that namespace.

        Directories the sandbox uid could not enter but that hold the interpreter (e.g. a pyenv Python under
        /root, mode 0700) are replaced by an empty tmpfs into which only the interpreter's dirs are bind-mounted
        (read-only), so the rest of them stays hidden.
        """
        _unshare(CLONE_NEWNS | CLONE_NEWIPC)  # IPC too: SysV shm/semaphores would outlive the call
        _mount(None, "/", None, MS_REC | MS_PRIVATE)
        _mount(workdir, workdir, None, MS_BIND)  # its own rw mount, unaffected by the read-only remount
        fd = os.open(workdir, os.O_PATH | os.O_DIRECTORY)
        try:
            try:
                _mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY)
            except OSError:
                pass  # best effort: the dropped uid cannot write outside world-writable dirs anyway
            if self.exposed:
                keep = {p: os.open(p, os.O_PATH | os.O_DIRECTORY) for paths in self.exposed.values() for p in paths}
                for hidden in self.exposed:
                    _mount("tmpfs", hidden, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=755")
                for path, pfd in keep.items():
                    os.makedirs(path, exist_ok=True)
                    _mount(f"/proc/self/fd/{pfd}", path, None, MS_BIND | MS_REC)
                    os.close(pfd)
            opts = f"size={int(self.cfg['tmpfs_mb'])}m,mode=1777"
            for d in ("/tmp", "/var/tmp", "/dev/shm"):
                if os.path.isdir(d):
                    _mount("tmpfs", d, "tmpfs", MS_NOSUID | MS_NODEV, opts)
            here = os.fstat(fd)
            try:
                st = os.stat(workdir)
                same = (st.st_dev, st.st_ino) == (here.st_dev, here.st_ino)
            except OSError:
                same = False
            if not same:
                os.makedirs(workdir, exist_ok=True)
                _mount(f"/proc/self/fd/{fd}", workdir, None, MS_BIND)
            if new_proc:  # last: the bind mounts above go through the host's /proc/self/fd
                _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        finally:
            os.close(fd)

    def info(self) -> dict:
        return {"type": "ready", "pid": self.pid, "uid": self.uid, "network": self.network,
                "mount_isolation": self.mount_isolation, "drop_privileges": self.is_root,
                "seccomp": self.seccomp is not None, "memory_cap": self.memory_cap,
                "pid_namespace": self.pid_namespace}

    # ---------------------------------------------------------------- one call
    def run(self, code: bytes, timeout_s: float, out_fd: int) -> dict:
        cfg = self.cfg
        workdir = tempfile.mkdtemp(prefix="run_", dir=self.work_root)
        if self.uid is not None:
            os.chown(workdir, self.uid, self.uid)
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        st_r, st_w = os.pipe()
        self._calls += 1
        cgroup = None
        if self._cg_parent is not None:
            try:
                cgroup = SnippetCgroup(self.memory_cap, self._cg_parent, f"tepo_sandbox_{self.pid}_{self._calls}",
                                       int(cfg["total_memory_mb"]) << 20)
            except OSError as exc:  # e.g. the hierarchy turned read-only: fall back, and say so
                print(f"tepo sandbox: cgroup memory cap unavailable ({exc}); per-process limits only",
                      file=sys.stderr)
                self.memory_cap, self._cg_parent = "rlimit", None
        t0 = time.monotonic()
        try:
            pid = self._fork_snippet()
        except OSError:  # e.g. EAGAIN / ENOSPC (pid or namespace limits): nothing started, leave nothing behind
            for fd in (out_r, out_w, err_r, err_w, st_r, st_w):
                os.close(fd)
            shutil.rmtree(workdir, ignore_errors=True)
            if cgroup is not None:
                cgroup.remove()
            raise
        if pid == 0:  # ----------------------------------------------------------- child, never returns
            try:
                _child_main(self, code, workdir, out_w, err_w, st_w, cgroup=cgroup)
            finally:
                os._exit(_SETUP_FAIL_EXIT)
        for fd in (out_w, err_w, st_w):
            os.close(fd)
        write_frame(out_fd, {"type": "started", "pid": pid, "workdir": workdir})
        caps = {out_r: _Capture(cfg["keep_bytes"]), err_r: _Capture(cfg["keep_bytes"])}
        status = bytearray()
        pidfd = os.pidfd_open(pid)
        poller = select.poll()
        for fd in (out_r, err_r, st_r, pidfd):
            poller.register(fd, select.POLLIN)
        open_fds = {out_r, err_r, st_r}
        deadline = t0 + timeout_s
        timed_out = output_limit = exited = False
        while not exited:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                break
            for fd, _ in poller.poll(max(1, int(remaining * 1000) + 1)):
                if fd == pidfd:
                    exited = True
                    continue
                data = os.read(fd, 1 << 16)
                if not data:
                    poller.unregister(fd)
                    open_fds.discard(fd)
                elif fd == st_r:
                    status += data[: max(0, 4096 - len(status))]
                else:
                    caps[fd].add(data)
            if caps[out_r].total + caps[err_r].total > cfg["kill_bytes"]:
                output_limit = True
                break
        duration = time.monotonic() - t0
        # Kill and reap everything the snippet left behind; orphans come to us (subreaper).
        if not exited:
            _kill_subtree(pid)
        _, wstatus = os.waitpid(pid, 0)
        os.close(pidfd)
        self._reap_descendants()
        # Every writer is dead now: drain what is still buffered in the pipes (bounded in time as well).
        drain_deadline = time.monotonic() + 0.5
        for fd in list(open_fds):
            while time.monotonic() < drain_deadline:
                r, _, _ = select.select([fd], [], [], 0.05)
                data = os.read(fd, 1 << 16) if r else b""
                if not data:
                    break
                if fd == st_r:
                    status += data[: max(0, 4096 - len(status))]
                elif not output_limit:
                    caps[fd].add(data)
        for fd in (out_r, err_r, st_r):
            os.close(fd)
        shutil.rmtree(workdir, ignore_errors=True)
        memory_oom = False
        if cgroup is not None:
            memory_oom = cgroup.oom_killed()
            cgroup.remove()
        exit_code = os.waitstatus_to_exitcode(wstatus)
        text = status.decode("utf-8", "replace")
        if self.pid_namespace:
            text, snippet_signal = split_signal_trailer(text)
            if snippet_signal is not None and not timed_out:
                exit_code = -snippet_signal
        setup_error = text[len("setup_error:"):] if text.startswith("setup_error:") else None
        o, e = caps[out_r], caps[err_r]
        return {
            "type": "result", "exit_code": exit_code, "timed_out": timed_out, "output_limit": output_limit,
            "memory_oom": memory_oom,
            "status": None if setup_error else (text.strip() or None), "setup_error": setup_error,
            "duration_s": duration, "stdout_total": o.total, "stderr_total": e.total,
            "parts": [len(o.head), len(o.tail), len(e.head), len(e.tail)],
            "_payload": bytes(o.head) + bytes(o.tail) + bytes(e.head) + bytes(e.tail),
        }

    def _reap_descendants(self, deadline_s: float = 5.0) -> None:
        deadline = time.monotonic() + deadline_s
        delay = 0.0005
        while not _reap_nohang():
            if time.monotonic() > deadline:
                print("tepo sandbox: descendants survived cleanup", file=sys.stderr)
                return
            for child in _children(self.pid):
                _kill_subtree(child)
            time.sleep(delay)
            delay = min(delay * 2, 0.02)


# ---------------------------------------------------------------------------------------------- the child
def _child_main(server: _Server, code: bytes, workdir: str, out_w: int, err_w: int, st_w: int,
                cgroup: SnippetCgroup | None = None) -> None:
    cfg = server.cfg
    try:
        if cgroup is not None:  # first, so every process the snippet forks is counted against the cap
            cgroup.enter()
        os.setsid()
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out_w, 1)
        os.dup2(err_w, 2)
        os.dup2(st_w, _STATUS_FD)
        os.closerange(_STATUS_FD + 1, max(os.sysconf("SC_OPEN_MAX"), 4096))
        os.set_inheritable(_STATUS_FD, False)
        if server.mount_isolation:
            server._isolate_mounts(workdir, new_proc=server.pid_namespace)
        os.chdir(workdir)
        os.environ.clear()
        os.environ.update({
            "PATH": server.path_dirs, "HOME": workdir, "TMPDIR": "/tmp" if server.mount_isolation else workdir,
            "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "PYTHONIOENCODING": "utf-8", "PYTHONDONTWRITEBYTECODE": "1",
            "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg",
        })
        tempfile.tempdir = None
        nproc = int(cfg["max_processes"])  # with a PID namespace its init (pid 1) counts as one of them
        if server.uid is None:  # RLIMIT_NPROC counts every process of the (shared) uid, this one included
            nproc += _count_own_processes() - 1
        mb = 1 << 20
        for res, soft, hard in (
            (resource.RLIMIT_CORE, 0, 0),
            (resource.RLIMIT_CPU, int(cfg["cpu_time_s"]), int(cfg["cpu_time_s"]) + 1),
            (resource.RLIMIT_AS, int(cfg["memory_mb"]) * mb, int(cfg["memory_mb"]) * mb),
            (resource.RLIMIT_FSIZE, int(cfg["max_file_mb"]) * mb, int(cfg["max_file_mb"]) * mb),
            (resource.RLIMIT_NOFILE, int(cfg["max_open_files"]), int(cfg["max_open_files"])),
            (resource.RLIMIT_NPROC, nproc, nproc),
        ):
            resource.setrlimit(res, (soft, hard))
        if server.uid is not None:
            os.setgroups([])
            os.setresgid(server.uid, server.uid, server.uid)
            os.setresuid(server.uid, server.uid, server.uid)
        _prctl(PR_SET_NO_NEW_PRIVS, 1)
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # after setuid: credential changes reset it
        # The server died before PDEATHSIG was armed? (In a PID namespace getppid() is 0 whoever the parent
        # is, so there only the status pipe tells: its reader, held by the server alone, is gone.)
        if (not server.pid_namespace and os.getppid() != server.pid) or _reader_gone(_STATUS_FD):
            os._exit(_SETUP_FAIL_EXIT)
        if server.pid_namespace:
            snippet = os.fork()
            if snippet != 0:
                _pid1_main(snippet)  # this process is the namespace's init; the snippet runs in its child (pid 2)
        if server.seccomp is not None:
            _install_seccomp(server.seccomp[0])
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if server.network == "audit":
            sys.addaudithook(_audit_guard)
    except BaseException as exc:  # noqa: BLE001
        try:
            os.write(_STATUS_FD, f"setup_error:{type(exc).__name__}: {exc}".encode()[:1000])
        finally:
            os._exit(_SETUP_FAIL_EXIT)
    _run_user_code(code, workdir)


_SIGNAL_TRAILER = "\n#signal:"


def _pid1_main(snippet: int) -> None:
    """pid 1 of a snippet's PID namespace: reap, and when the snippet (its first child) ends, report how and exit.

    The kernel shields a namespace's init from signals it has no handler for, so the snippet itself must not
    be pid 1 (SIGXCPU, or a signal it sends itself, would be ignored). A snippet killed by signal N is reported
    as a trailer on the status pipe (this process cannot die by that signal itself); exiting kills whatever
    the snippet left running in the namespace.
    """
    try:
        for fd in (0, 1, 2):
            os.close(fd)
        wstatus = 0
        while True:  # reap orphans too, until the snippet itself is gone
            try:
                pid, wstatus = os.wait()
            except ChildProcessError:
                break
            if pid == snippet:
                break
        code = os.waitstatus_to_exitcode(wstatus)
        if code < 0:
            os.write(_STATUS_FD, f"{_SIGNAL_TRAILER}{-code}".encode())
            os._exit(128 - code)
        os._exit(code & 0xFF)
    finally:
        os._exit(_SETUP_FAIL_EXIT)


def split_signal_trailer(status: str) -> tuple[str, int | None]:
    """(status text, signal that killed the snippet) from what a PID-namespace init appended to the status."""
    head, sep, tail = status.rpartition(_SIGNAL_TRAILER)
    if sep and tail.isdigit():
        return head, int(tail)
    return status, None


def _reader_gone(fd: int) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(ev & select.POLLERR for _, ev in poller.poll(0))


def _count_own_processes() -> int:
    uid = os.getuid()
    n = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                n += os.stat(entry.path).st_uid == uid
            except OSError:
                pass
    return n


def _new_stream(fd: int, mode: str) -> io.TextIOWrapper:
    raw = io.FileIO(fd, mode, closefd=False)
    if mode == "r":
        return io.TextIOWrapper(io.BufferedReader(raw), encoding="utf-8", errors="replace")
    # Line buffered, so output printed before a timeout or crash still reaches the model.
    return io.TextIOWrapper(io.BufferedWriter(raw), encoding="utf-8", errors="backslashreplace", line_buffering=True)


def _run_user_code(code_bytes: bytes, workdir: str) -> None:
    """Execute the snippet like a notebook cell; exits the process (never returns).

    Display rule (Jupyter's): if the last statement is a bare expression, its value is printed with repr()
    unless it is None, whatever else was printed before.
    """
    main_pid = os.getpid()
    sys.stdin, sys.stdout, sys.stderr = _new_stream(0, "r"), _new_stream(1, "w"), _new_stream(2, "w")
    sys.__stdin__, sys.__stdout__, sys.__stderr__ = sys.stdin, sys.stdout, sys.stderr
    sys.argv = [CODE_FILENAME]
    sys.path.insert(0, workdir)
    module = types.ModuleType("__main__")
    module.__dict__["__builtins__"] = builtins
    sys.modules["__main__"] = module
    status, exit_code = "ok", 0
    code = code_bytes.decode("utf-8", "surrogatepass")
    linecache.cache[CODE_FILENAME] = (len(code), None, code.splitlines(True), CODE_FILENAME)
    try:
        tree = ast.parse(code, CODE_FILENAME, "exec")
        last = None
        if tree.body and isinstance(tree.body[-1], ast.Expr):
            last = compile(ast.Expression(tree.body.pop().value), CODE_FILENAME, "eval")
        body = compile(tree, CODE_FILENAME, "exec")
    except (SyntaxError, ValueError) as exc:
        traceback.print_exception(type(exc), exc, None)
        status, exit_code = "syntax_error", 1
    except BaseException as exc:  # noqa: BLE001 - e.g. RecursionError / MemoryError from the parser
        traceback.print_exception(type(exc), exc, None)
        status, exit_code = f"exception:{type(exc).__name__}", 1
    else:
        try:
            exec(body, module.__dict__)  # noqa: S102 - this is the sandbox
            if last is not None:
                value = eval(last, module.__dict__)  # noqa: S307
                if value is not None:
                    print(repr(value))
        except SystemExit as exc:
            status, exit_code = "exit", _exit_code(exc)
        except BaseException as exc:  # noqa: BLE001
            status, exit_code = f"exception:{type(exc).__name__}", 1
            _print_user_traceback(exc)
    _finish(status, exit_code, main_pid)


def _exit_code(exc: SystemExit) -> int:
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code
    try:
        print(exc.code, file=sys.stderr)
    except Exception:  # noqa: BLE001
        pass
    return 1


def _print_user_traceback(exc: BaseException) -> None:
    """Traceback without the bootstrap's own frames (they start before the first `<code>` frame)."""
    try:
        tb = exc.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename != CODE_FILENAME:
            tb = tb.tb_next
        depth, t = 0, tb
        while t is not None and depth <= _TB_FULL_DEPTH:
            depth, t = depth + 1, t.tb_next
        # Very deep stacks (recursion under a raised limit): only the innermost frames, or formatting them
        # all would burn the CPU budget.
        limit = None if depth <= _TB_FULL_DEPTH else -_TB_DEEP_FRAMES
        traceback.print_exception(type(exc), exc, tb or exc.__traceback__, limit=limit)
    except BaseException:  # noqa: BLE001 - e.g. MemoryError while formatting
        try:
            os.write(2, f"{type(exc).__name__}\n".encode())
        except OSError:
            pass


def _finish(status: str, exit_code: int, main_pid: int) -> None:
    """What interpreter shutdown would do (join threads, atexit, flush), then exit without unwinding the server."""
    try:
        threading = sys.modules.get("threading")
        if threading is not None and hasattr(threading, "_shutdown"):
            threading._shutdown()
        atexit._run_exitfuncs()
    except BaseException:  # noqa: BLE001
        pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:  # noqa: BLE001
            pass
    if os.getpid() == main_pid:  # forked user processes return through here too: only the snippet reports
        try:
            os.write(_STATUS_FD, f"{status}:{exit_code}".encode() if status == "exit" else status.encode())
        except OSError:
            pass
    os._exit(exit_code & 0xFF)


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "--sweep":
        return 0 if sweep_uid(int(argv[1])) else 1
    # Keep the protocol off fds 0/1 so that a stray print cannot corrupt it.
    in_fd, out_fd = os.dup(0), os.dup(1)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    first = read_frame(in_fd)
    if first is None:
        return 0
    try:
        server = _Server(first[0])
    except (SetupError, OSError) as exc:
        write_frame(out_fd, {"type": "error", "message": f"{type(exc).__name__}: {exc}"})
        return 2
    write_frame(out_fd, server.info())
    while True:
        frame = read_frame(in_fd)
        if frame is None:
            return 0
        header, payload = frame
        try:
            result = server.run(payload, float(header["timeout_s"]), out_fd)
        except Exception as exc:  # noqa: BLE001 - e.g. the work root vanished; report, keep serving
            result = {"type": "result", "exit_code": None, "timed_out": False, "output_limit": False,
                      "status": None, "setup_error": f"server: {type(exc).__name__}: {exc}", "duration_s": 0.0,
                      "stdout_total": 0, "stderr_total": 0, "parts": [0, 0, 0, 0], "_payload": b""}
        payload = result.pop("_payload")
        write_frame(out_fd, result, payload)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
