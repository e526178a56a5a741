"""The bwrap backend's fork server: sandboxes forked from one resident, idle interpreter.

A classic bwrap sandbox costs its worker ~18-20 ms of CPU to start: a shell that joins the
cgroups, ``setpriv``, ``nice`` and ``prlimit`` execs, bwrap's namespaces, and above all a
new interpreter importing the runner. A ``Zygote`` pays most of that once per provider: it
starts ``runner.py --zygote`` under (nearly) the classic bwrap command, and each sandbox is
then a fork of it that makes its own namespaces (``runner.py``'s zygote section):

1. ``spawn`` sends the zygote the sandbox's limits and, by ``SCM_RIGHTS``, the runner's
   stdin and stdout pipes, its log, a status pipe and a go pipe, over a ``SOCK_SEQPACKET``
   socket. The zygote forks the child and answers with its pidfd.
2. The worker reads the child's host pid off the pidfd (``/proc/self/fdinfo``) and moves
   it into the sandbox's memory, pids and CPU cgroups, then writes the go byte: nothing the
   child starts ever runs outside them.
3. The child unshares user, mount, pid, net, ipc, uts and cgroup namespaces, mounts its own
   ``/work`` (``work_mb``, ``work_files``), ``/tmp``, ``/dev/shm``, ``/dev/pts`` and
   ``/proc``, forks a pid 1 that dies with it, and that forks the runner, which takes the
   classic rlimits, drops every capability, cannot make a user namespace
   (``max_user_namespaces`` is 0 in its own) and serves the session.
4. Killing the sandbox is SIGKILL to the child by its pidfd: its pid 1 dies with it
   (``PR_SET_PDEATHSIG``) and the kernel kills the rest of its pid namespace. The zygote
   reaps the child and writes its exit status into the status pipe.

Isolation between two sandboxes of one zygote is what two classic sandboxes have: each has
its own mount namespace (so its own ``/work``, ``/tmp``, ``/dev/shm``, ptys; the
zygote's ``/dev``, which would be the one writable place they share, is read-only), pid
namespace (it sees, signals and traces only its own processes; the zygote is outside),
network namespace (its own loopback and abstract unix sockets), ipc and uts namespaces,
and its own memory and pids cgroups. They all run under the zygote's one host uid: the
per-sandbox host uid of the classic path, whose purpose was a separate ``RLIMIT_NPROC``
count per sandbox, is replaced by the sandbox's pids cgroup (and by its own user
namespace, in which the kernel counts ``RLIMIT_NPROC`` apart from its siblings'). What the
kernel counts per host uid and nothing else bounds, the siblings share: inotify instances
and watches (each sandbox may take 16 and 8192, a share of the host's 128 instances per
uid, set in its own user namespace), pending signals and POSIX message queue bytes (the
host's per-uid limits, far above what one runner needs). A worker that does not run as
root has this on the classic path too (all its sandboxes run under its uid).

The zygote needs writable cgroups (the child must be in them before it runs) and
unprivileged user namespaces; ``BwrapSandbox`` falls back to the classic path where it
cannot start (``ZygoteUnavailable``), and for tasks that ask for network. A zygote that
dies takes its sandboxes with it (their sessions see ``RunnerLost`` and restart); the next
``spawn`` starts a new one.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import select
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import structlog

from agent.errors import SandboxError
from workers.sandbox.bwrap_dirs import log_tail
from workers.sandbox.cgroups import Cgroups, join_command
from workers.sandbox.protocol import SessionClient
from workers.sandbox.session import EXIT_WAIT_S, Exit

log = structlog.get_logger(__name__)

ZYGOTE_PIDS_MAX = 64  # the zygote, bwrap's init, and children before they move out
ZYGOTE_MEMORY_MB = 512
STATUS = struct.Struct(">i")
_zygote_ids = itertools.count()  # names this process's zygotes' cgroups apart


class ZygoteUnavailable(SandboxError):
    """The zygote could not be started or would not spawn: use the classic path."""


@dataclass(frozen=True, slots=True)
class ChildLimits:
    """What a spawn asks for: the runner's rlimits and the sizes of its tmpfs mounts."""

    memory_bytes: int
    cpu_s: int
    nproc: int
    fsize_bytes: int
    nofile: int
    work_bytes: int
    work_files: int
    tmpfs_bytes: int

    def request(self) -> bytes:
        return json.dumps(
            {
                "op": "spawn",
                "limits": {
                    "as": self.memory_bytes,
                    "cpu": self.cpu_s,
                    "nproc": self.nproc,
                    "fsize": self.fsize_bytes,
                    "nofile": self.nofile,
                },
                "mounts": {
                    "work_bytes": self.work_bytes,
                    "work_files": self.work_files,
                    "tmpfs_bytes": self.tmpfs_bytes,
                },
            }
        ).encode()


@dataclass(slots=True)
class Child:
    """A spawned sandbox, in its cgroups and let go. The fds are the caller's to close:
    ``to_runner`` and ``from_runner`` (the protocol), ``status`` (the zygote writes the
    exit status there), ``pidfd``."""

    pid: int  # host pid of the child C
    pidfd: int
    status: int
    to_runner: int
    from_runner: int


class Zygote:
    """One fork server (per ``BwrapProvider``), started at the first ``spawn``.

    ``command(fd)`` is the argv that runs ``runner.py --zygote fd`` under bwrap (the
    provider builds it); ``cgroups`` are the host's (required). Thread-safe: spawns are
    serialised, each takes a fork and a few cgroup writes.
    """

    def __init__(
        self,
        command: Callable[[int], list[str]],
        cgroups: Cgroups,
        log_path: Callable[[], Path],
        start_timeout_s: float,
    ) -> None:
        self._command = command
        self._cgroups = cgroups
        self._log_path = log_path
        self._start_timeout_s = start_timeout_s
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self.starts = 0  # zygotes started so far (a restart after a death counts)
        self.broken: str | None = None  # why no zygote could start: never tried again
        self.proven = False  # a child became ready: later failures are the child's own
        self._fell_back = False

    def fall_back(self, reason: str) -> None:
        """Note that a sandbox takes the classic path because of ``reason``: logged once
        per provider (every start after it would say the same)."""
        if not self._fell_back:
            self._fell_back = True
            log.warning("sandbox.zygote_unavailable", reason=reason)

    @property
    def pid(self) -> int | None:
        """The host pid of the zygote's outer bwrap (None: not running)."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def spawn(self, limits: ChildLimits, log_fd: int, cgroup_procs: Sequence[Path]) -> Child:
        """Fork a sandbox, move it into the cgroups whose ``cgroup.procs`` are given and
        let it go. Raises ``ZygoteUnavailable`` if no zygote can be started, it refuses
        the spawn (a fork it could not make), or the child could not join its cgroups; a
        zygote found dead is replaced once."""
        with self._lock:  # one request and its answer at a time on the socket
            if self.broken is not None:
                raise ZygoteUnavailable(self.broken)
            for attempt in (1, 2):
                sock = self._ensure_started()
                try:
                    child, go = self._fork(sock, limits, log_fd)
                    break
                except OSError as e:  # the socket failed: the zygote is dead or wedged
                    self._stop()
                    if attempt == 2:
                        raise ZygoteUnavailable(f"the zygote failed a spawn: {e}") from e
        # Outside the lock: a cgroup move waits milliseconds on the kernel (wall, not CPU).
        try:
            for procs in cgroup_procs:  # before it runs anything: the go byte comes after
                procs.write_text(str(child.pid))
            os.write(go, b"g")
        except OSError as e:
            kill(child.pidfd)
            for fd in (child.pidfd, child.status, child.to_runner, child.from_runner):
                os.close(fd)
            raise ZygoteUnavailable(f"the sandbox could not join its cgroups: {e}") from e
        finally:
            os.close(go)
        return child

    def close(self) -> None:
        """No more spawns. The zygote exits once its last sandbox has (they are closed
        by their sessions, or die with this process)."""
        with self._lock:
            self.broken = "the provider is closed"  # a later restart takes the classic path
            sock, self._sock, self._proc = self._sock, None, None
            if sock is not None:
                sock.close()

    # -- internals (with _lock held) ----------------------------------------------------

    def _fork(self, sock: socket.socket, limits: ChildLimits, log_fd: int) -> tuple[Child, int]:
        """Ask the zygote for a child; it and the write end of its go pipe. ``OSError``:
        the socket failed; ``ZygoteUnavailable``: the zygote answered it could not."""
        to_runner_r, to_runner_w = os.pipe2(os.O_CLOEXEC)
        from_runner_r, from_runner_w = os.pipe2(os.O_CLOEXEC)
        status_r, status_w = os.pipe2(os.O_CLOEXEC)
        go_r, go_w = os.pipe2(os.O_CLOEXEC)
        ours = [to_runner_w, from_runner_r, status_r, go_w]
        try:
            try:
                passed = [to_runner_r, from_runner_w, log_fd, status_w, go_r]
                socket.send_fds(sock, [limits.request()], passed)
            finally:
                for fd in (to_runner_r, from_runner_w, status_w, go_r):
                    os.close(fd)
            data, fds, _, _ = socket.recv_fds(sock, 65536, 1)
            if not data:
                raise ConnectionResetError("the zygote closed its socket")
            if not fds:
                raise ZygoteUnavailable(f"the zygote could not fork: {data[:500]!r}")
            ours.append(fds[0])
            try:
                pid = _pid_of(fds[0])
            except ValueError as e:
                raise ZygoteUnavailable(str(e)) from e
        except BaseException:
            for fd in ours:
                os.close(fd)
            raise
        return Child(pid, fds[0], status_r, to_runner_w, from_runner_r), go_w

    def _ensure_started(self) -> socket.socket:
        if self._proc is not None and self._proc.poll() is None and self._sock is not None:
            return self._sock
        self._stop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            name = f"{self._log_path().parent.name}-zygote-{next(_zygote_ids)}"
            procs = self._cgroups.create(name, ZYGOTE_MEMORY_MB * 1024 * 1024, ZYGOTE_PIDS_MAX)
            cpu = self._cgroups.cpu
            if cpu is not None:
                procs = [*procs, cpu.busy]
            with open(self._log_path(), "ab") as log_file:
                self._proc = _start_kept(
                    lambda: self._cgroups.remove(name),
                    join_command(procs, self._command(theirs.fileno())),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=log_file,
                    pass_fds=(theirs.fileno(),),
                    env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"},
                    start_new_session=True,
                )
            self.starts += 1
        except OSError as e:
            ours.close()
            self.broken = f"could not start the zygote: {e}"
            raise ZygoteUnavailable(self.broken) from e
        finally:
            theirs.close()
        self._sock = ours
        ours.settimeout(self._start_timeout_s)
        try:
            hello = json.loads(ours.recv(4096) or b"null")
            if not isinstance(hello, dict) or not hello.get("ready"):
                raise ValueError(f"the zygote said {hello!r}")
        except (OSError, ValueError) as e:
            self._stop()
            self.broken = f"the zygote did not start: {e}; {log_tail(self._log_path(), 1000)}"
            raise ZygoteUnavailable(self.broken) from e
        log.info("sandbox.zygote_started", pid=self._proc.pid, starts=self.starts)
        return ours

    def _stop(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()  # the zygote exits on EOF; its sandboxes die with its namespace
        proc, self._proc = self._proc, None
        if proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


class ZygoteBox:
    """One sandbox forked by the zygote (``session.Box``). ``owner`` is its
    ``BwrapSandbox``: what it says of the runner's log and memory, and its cgroups' name,
    whose pids group tells when the sandbox's last process is gone."""

    def __init__(self, child: Child, client: SessionClient, owner: BoxOwner) -> None:
        self.child = child
        self.client = client
        self._owner = owner
        self._lock = threading.Lock()  # kill() from any thread against stop() closing fds
        self._closed = False
        self._ended = False  # the status pipe spoke (or ended): ``_code`` is all we learn
        self._code: int | None = None

    @property
    def pid(self) -> int:
        """The host pid of the sandbox's outer process (C)."""
        return self.child.pid

    def alive(self) -> bool:
        with self._lock:
            if self._closed or self._ended:
                return False
            poller = select.poll()
            poller.register(self.child.status, select.POLLIN)
            return not poller.poll(0)

    def stop(self, wait_s: float) -> Exit:
        if not (wait_s and self._wait(wait_s)):
            self.kill()
            self._wait(EXIT_WAIT_S)
        with self._lock:
            if not self._closed:
                self._closed = True
                for fd in (self.child.pidfd, self.child.status):
                    os.close(fd)
        self.client.close()
        owner = self._owner
        if owner.cgroups is not None:
            wait_empty(owner.cgroups, owner.cgroup_name, EXIT_WAIT_S)
        if not wait_s:
            return Exit()
        return Exit(self._code, oom_killed=owner._oom_killed())

    def kill(self) -> None:
        with self._lock:
            if not self._closed:
                kill(self.child.pidfd)

    def detail(self) -> str:
        return self._owner._log_tail()

    def _wait(self, timeout_s: float) -> bool:
        """Whether the child's end is known within ``timeout_s`` (its status read)."""
        if self._ended or self._closed:
            return True
        got = wait_status(self.child.status, timeout_s)
        if got is False:
            return False
        self._ended, self._code = True, got
        return True


class BoxOwner(Protocol):
    cgroups: Cgroups | None

    @property
    def cgroup_name(self) -> str: ...

    def _oom_killed(self) -> bool: ...

    def _log_tail(self) -> str: ...


def _start_kept(
    after: Callable[[], None], command: list[str], **popen: Any
) -> subprocess.Popen[bytes]:
    """``Popen(command)`` from a thread of its own that then waits for it, and calls
    ``after`` once it has exited. bwrap's ``--die-with-parent`` is the kernel's
    parent-death signal, which follows the *thread* that forked: started from a task's
    thread, the zygote (and every sandbox) would die when that thread ends."""
    started: list[subprocess.Popen[bytes] | OSError] = []
    ready = threading.Event()

    def keep() -> None:
        try:
            started.append(subprocess.Popen(command, **popen))
        except OSError as e:
            started.append(e)
        finally:
            ready.set()
        found = started[0]
        if isinstance(found, subprocess.Popen):
            found.wait()
        after()

    threading.Thread(target=keep, name="bwrap-zygote", daemon=True).start()
    ready.wait()
    if isinstance(started[0], OSError):
        raise started[0]
    return started[0]


def _pid_of(pidfd: int) -> int:
    """The pid, in this process's pid namespace, of the process a pidfd names."""
    with open(f"/proc/self/fdinfo/{pidfd}") as f:
        for line in f:
            if line.startswith("Pid:"):
                pid = int(line.split()[1])
                if pid > 0:
                    return pid
    raise ValueError("the child is already gone (its pidfd names no pid)")


def kill(pidfd: int) -> None:
    """SIGKILL to the process of ``pidfd``; nothing if it is gone. Never raises."""
    with contextlib.suppress(OSError):
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)


def wait_status(status_fd: int, timeout_s: float) -> int | bool | None:
    """The child's exit status from its status pipe: an int; None once the zygote died
    without saying; False if nothing came within ``timeout_s``."""
    poller = select.poll()
    poller.register(status_fd, select.POLLIN)
    if not poller.poll(max(timeout_s, 0) * 1000):
        return False
    try:
        data = os.read(status_fd, STATUS.size)
    except OSError:
        return None
    return STATUS.unpack(data)[0] if len(data) == STATUS.size else None


def wait_empty(cgroups: Cgroups, name: str, timeout_s: float) -> None:
    """Until the sandbox's pids cgroup has no member (its namespace's processes are all
    gone), or ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while cgroups.members(name) and time.monotonic() < deadline:
        time.sleep(0.005)
