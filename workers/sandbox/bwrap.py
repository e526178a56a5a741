"""The bubblewrap sandbox backend: one runner process per task, no container engine needed.

Each sandbox is ``[join cgroups] setpriv <uid> nice prlimit <rlimits> bwrap <namespaces>
python3 runner.py``:

- namespaces: ``--unshare-all`` (no network, own pid/ipc/uts/cgroup namespaces) plus a user
  namespace in which the code runs as uid 65534 with no capabilities; ``--die-with-parent``
  and ``--new-session``; nested user namespaces are disabled.
- files: ``/usr`` (and the ``/bin``, ``/lib*`` links), a few ``/etc`` files and the runner
  are mounted read-only; ``/work`` (the cwd) is a tmpfs of ``work_mb`` and at most
  ``work_files`` files (``bwrap_dirs``: on the sandbox's private host folder when the worker
  may mount, else inside the sandbox); ``/tmp`` and ``/dev/shm`` are small tmpfs; minimal
  ``/proc``, ``/dev``. A worker that starts clears the folders of dead ones
  (``bwrap_dirs.clear_stale``).
- environment: cleared, then ``PATH``, ``HOME=/work``, ``LANG``, ``TMPDIR``,
  ``PYTHONDONTWRITEBYTECODE``, ``PYTHONUNBUFFERED`` only: no secret reaches the sandbox.
- caps: a task asking for more ``memory_mb`` or ``cpus`` than the server's caps is refused
  (``SandboxRefused``; the API refuses it first).
- limits (``prlimit``): address space = ``spec.sandbox.memory_mb``, CPU seconds, processes,
  file size, open files, no core dumps. When the worker runs as root, each sandbox runs under
  its own host uid so ``RLIMIT_NPROC`` bounds that sandbox only (a fork bomb stays inside;
  the kernel does not apply ``RLIMIT_NPROC`` to host root).
- cgroups (``cgroups.py``, where v1 memory and pids are writable): ``memory_mb`` and the
  process cap hold for all of the sandbox's processes together; where v1 cpu is writable
  too, pool sandboxes start, and finished ones die, in a low-weight CPU group (refills and
  teardowns yield to the workers); a task's sandbox runs in a group that weighs, for all of
  them together, one worker thread.
- the network, when the server allows it and the task asks: ``--share-net``.

A sandbox whose code would not stop, ran out of memory or crashed is killed; the next
``execute`` starts a fresh runner and re-applies the task's files and ``setup_code``.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import itertools
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from agent.errors import SandboxError, SandboxRefused, SetupError
from agent.models import TaskSpec
from agent.sandbox import ExecResult
from workers.sandbox import bwrap_dirs
from workers.sandbox.caps import over_caps
from workers.sandbox.cgroups import Cgroups, join_command
from workers.sandbox.pool import WarmPool
from workers.sandbox.protocol import (
    DEFAULT_GRACE_S,
    PipeChannel,
    RunnerClient,
    RunnerDeadline,
    RunnerLost,
)

RUNNER_PATH = Path(__file__).resolve().parents[2] / "sandbox_images" / "python" / "runner.py"
RUNNER_EXIT_OUT_OF_MEMORY = 86  # runner.py's EXIT_OUT_OF_MEMORY
SANDBOX_UID = 65534
SANDBOX_WORK_DIR = "/work"
SANDBOX_RUNNER_PATH = "/opt/actfleet/runner.py"
_ETC_FILES = (
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "alternatives",
    "localtime",
    "ssl",
    "ca-certificates",
    "nsswitch.conf",
    "mime.types",
    "os-release",
    "debian_version",
)
POOL_CREATORS = 2  # sandboxes a warm pool starts at once: a start mostly waits on the kernel
_HOST_UID_BASE = 600_000  # host uids for sandboxes when running as root
_HOST_UID_SPAN = 100_000
_uid_counter = itertools.count()
_LOST = "all variables and imports were lost"


@dataclass(frozen=True, slots=True)
class BwrapConfig:
    """Everything a sandbox needs to (re)start its runner; built once by the provider."""

    bwrap: str
    prlimit: str
    python: str
    runner_path: Path
    base_dir: str | None
    grace_s: float
    start_timeout_s: float
    nproc: int
    fsize_mb: int
    nofile: int
    tmpfs_mb: int
    work_mb: int
    work_files: int
    mount_work: bool
    separate_uids: bool
    nice: int


class BwrapProvider:
    """A ``SandboxProvider`` on bubblewrap. Construction does no I/O.

    ``python`` is the interpreter inside the sandbox (default ``/usr/bin/python3`` if it
    exists, else this process's interpreter); it must be >= 3.11 and readable by the
    sandbox's uid. An interpreter outside ``/usr`` has its install prefix mounted read-only.
    ``base_dir`` (default: the system temp dir) holds one directory per sandbox; every
    directory on its path must be searchable (``o+x``) by the sandbox's host uid.
    ``max_memory_mb`` and ``max_cpus`` are the server's caps on what a task may ask for
    (None: the task spec's own bounds). ``/work`` is a tmpfs of ``work_mb`` with at most
    ``work_files`` files, on the host folder if ``mount_work`` and this process may mount
    (else inside the sandbox, without the file bound: see ``bwrap_dirs``).
    """

    backend = "bwrap"

    def __init__(
        self,
        runner_path: str | Path | None = None,
        python: str | None = None,
        *,
        bwrap: str = "bwrap",
        prlimit: str = "prlimit",
        base_dir: str | None = None,
        grace_s: float = DEFAULT_GRACE_S,
        start_timeout_s: float = 10.0,
        nproc: int = 128,
        fsize_mb: int = 64,
        nofile: int = 256,
        tmpfs_mb: int = 64,
        work_mb: int = 256,
        work_files: int = 10_000,
        mount_work: bool = True,
        max_memory_mb: int | None = None,
        max_cpus: float | None = None,
        separate_uids: bool | None = None,
        nice: int = 10,
        pool_min_size: int = 0,
        pool_max_size: int = 0,
        pool_idle_ttl_s: float = 300.0,
        pool_max_age_s: float = 1800.0,
        allow_network: bool = False,
        use_cgroups: bool = True,
    ) -> None:
        if python is None:
            python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
        self.config = BwrapConfig(
            bwrap=bwrap,
            prlimit=prlimit,
            python=python,
            runner_path=Path(runner_path) if runner_path else RUNNER_PATH,
            base_dir=base_dir,
            grace_s=grace_s,
            start_timeout_s=start_timeout_s,
            nproc=nproc,
            fsize_mb=fsize_mb,
            nofile=nofile,
            tmpfs_mb=tmpfs_mb,
            work_mb=work_mb,
            work_files=work_files,
            mount_work=mount_work,
            separate_uids=(os.geteuid() == 0) if separate_uids is None else separate_uids,
            nice=nice,
        )
        self._pool: WarmPool[BwrapSandbox] | None = None
        self.allow_network = allow_network
        self.max_memory_mb = max_memory_mb
        self.max_cpus = max_cpus
        self._cgroups: Cgroups | bool | None = use_cgroups  # True: detect at first start
        self._cgroups_lock = threading.Lock()
        self._pool_sizes = (pool_min_size, pool_max_size, pool_idle_ttl_s, pool_max_age_s)

    def start(self, spec: TaskSpec, task_id: str = "") -> BwrapSandbox:
        """A ready sandbox with ``spec.files`` written and ``spec.setup_code`` run: a warm
        one from the pool when the task's limits are the pool's, else a new one.

        Raises ``SetupError`` if setup_code fails, ``SandboxError`` if no sandbox started.
        """
        if spec.sandbox.network and not self.allow_network:
            raise SandboxRefused("this server does not give tasks network access")
        refused = over_caps(spec, self.max_memory_mb, self.max_cpus)
        if refused:
            raise SandboxRefused(refused)
        pool = self._pool
        warm = pool.acquire() if pool is not None and _limits(spec) == _limits(_POOLED) else None
        sandbox = warm or BwrapSandbox(self.config, spec, task_id, self.cgroups())
        try:
            if warm is not None:
                warm.adopt(spec, task_id)
            else:
                sandbox.boot()
        except BaseException:
            sandbox.close()
            raise
        return sandbox

    def start_pool(self) -> None:
        """Keep runners started ahead of demand (for tasks with the default limits), so a
        burst of tasks does not start a burst of interpreters at once. A no-op when the
        provider was made with ``pool_max_size=0``."""
        min_size, max_size, idle_ttl_s, max_age_s = self._pool_sizes
        if self._pool is not None or max_size <= 0:
            return

        def create() -> BwrapSandbox:
            sandbox = BwrapSandbox(self.config, _POOLED, "", self.cgroups(), pooled=True)
            sandbox.boot()
            return sandbox

        self._pool = WarmPool(
            create,
            BwrapSandbox.close,
            min_size=min_size,
            max_size=max_size,
            idle_ttl_s=idle_ttl_s,
            max_age_s=max_age_s,
            healthy=BwrapSandbox.alive,
            name="bwrap",
            creators=POOL_CREATORS,
        )
        self._pool.start()

    def cgroups(self) -> Cgroups | None:
        """The per-sandbox cgroups, found at the first start (None: rlimits only)."""
        with self._cgroups_lock:
            if self._cgroups is True:
                self._cgroups = Cgroups.detect()
            return self._cgroups or None

    def pool_idle(self) -> int:
        return self._pool.stats().idle if self._pool is not None else 0

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None


_POOLED = TaskSpec(prompt="")


def _limits(spec: TaskSpec) -> tuple[int, int, bool]:
    """What a runner process is started with (rlimits, network): the pool's key."""
    return spec.sandbox.memory_mb, _cpu_s(spec), spec.sandbox.network


def _cpu_s(spec: TaskSpec) -> int:
    return int(max(2 * spec.limits.timeout_s, 60))


class BwrapSandbox:
    """One task's session: a runner process under bubblewrap, restarted when it is lost.

    ``execute`` calls are serialised; ``close`` may come from any thread at any time.
    """

    def __init__(
        self,
        config: BwrapConfig,
        spec: TaskSpec,
        task_id: str,
        cgroups: Cgroups | None = None,
        *,
        pooled: bool = False,
    ) -> None:
        self.config = config
        self.cgroups = cgroups
        self._cgroup_procs: list[Path] = []
        self.spec = spec
        self.task_id = task_id
        self.restarts = 0
        self._waiting = pooled  # started ahead of demand, no task yet: low CPU weight
        self._exec_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._closed = False
        self._torn_down = False
        self._root: Path | None = None
        self._work_mounted = False  # /work is a tmpfs on the host folder (else in bwrap)
        self._proc: subprocess.Popen[bytes] | None = None
        self._client: RunnerClient | None = None
        self.host_uid = (
            _HOST_UID_BASE + (os.getpid() * 1009 + next(_uid_counter)) % _HOST_UID_SPAN
            if config.separate_uids
            else os.geteuid()
        )

    # -- public -------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """The host pid of the outer process (``bwrap``); its process group holds the rest."""
        return self._proc.pid if self._proc else None

    @property
    def work_dir(self) -> Path | None:
        """The host directory mounted at ``/work`` inside the sandbox (None when ``/work``
        exists inside the sandbox only)."""
        return self._root / "work" if self._root and self._work_mounted else None

    @property
    def root(self) -> Path | None:
        """The sandbox's host folder (``<tmp>/actfleet-bwrap-<owner>-*``)."""
        return self._root

    pool_hit = False

    def boot(self) -> None:
        """Start the runner, write the files, run setup_code (``SetupError`` if it fails)."""
        with self._exec_lock:
            if self._closed:
                raise SandboxError("the sandbox is closed")
            self._start_runner()

    def adopt(self, spec: TaskSpec, task_id: str) -> None:
        """Give a pooled sandbox (started for ``_POOLED``) to a task: write its files and
        run its setup_code, as ``boot`` does for a new one."""
        with self._exec_lock:
            if self._closed or self._client is None:
                raise SandboxError("the pooled sandbox is gone")
            self.spec, self.task_id, self.pool_hit = spec, task_id, True
            self._waiting = False
            self._move_cpu_group(busy=True)
            self._apply_task()

    def alive(self) -> bool:
        return not self._closed and self._proc is not None and self._proc.poll() is None

    def execute(self, code: str, timeout_s: float, max_output_chars: int) -> ExecResult:
        with self._exec_lock:
            if self._closed:
                return ExecResult(state_lost=True, note="The sandbox was closed.")
            try:
                if self._client is None:
                    self.restarts += 1
                    self._start_runner()
                assert self._client is not None
                started = time.monotonic()
                try:
                    return self._client.execute(code, timeout_s, max_output_chars)
                except RunnerLost as e:
                    return self._lost(e, timeout_s, time.monotonic() - started)
            except SetupError as e:
                raise SandboxError(f"could not restore the sandbox after a restart: {e}") from e
            finally:
                if self._closed:
                    self._teardown()

    def put_file(self, path: str, content: bytes) -> None:
        """Write a file into the work dir (``ValueError`` for a path outside it)."""
        with self._exec_lock:
            if self._client is None:
                raise SandboxError("the sandbox is not running")
            try:
                self._client.put_file(path, content)
            except RunnerLost as e:
                self._stop_runner()
                raise SandboxError(f"put_file failed: {e}") from e

    def close(self) -> None:
        """Kill the whole process tree and remove the work dir. Idempotent, thread-safe."""
        with self._state_lock:
            if self._closed:
                return
            self._closed = True
            proc = self._proc
        if proc is not None:
            self._move_cpu_group(busy=False)  # its processes' exits yield to live tasks
            _kill_sandbox(proc)  # unblocks an execute in flight: its recv sees EOF
        if self._exec_lock.acquire(timeout=10):
            try:
                self._teardown()
            finally:
                self._exec_lock.release()
        # else: the execute in flight tears down when it returns

    def __enter__(self) -> BwrapSandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _move_cpu_group(self, busy: bool) -> None:
        cgroups, root = self.cgroups, self._root
        if cgroups is None or cgroups.cpu is None or root is None:
            return
        if self._proc is not None and self._proc.returncode is None:
            cgroups.cpu.move(
                cgroups.members(root.name), cgroups.cpu.busy if busy else cgroups.cpu.warm
            )

    # -- runner lifecycle (called with _exec_lock held) -----------------------------------

    def _start_runner(self) -> None:
        if self._root is None:
            self._root = self._make_root()
        log = open(self._root / "runner.log", "ab")  # noqa: SIM115 (the child keeps it)
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        try:
            with self._state_lock:
                if self._closed:
                    raise SandboxError("the sandbox was closed while starting")
                self._proc = subprocess.Popen(
                    self._command(),
                    stdin=to_child_r,
                    stdout=from_child_w,
                    stderr=log,
                    cwd=self._root,
                    env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"},
                    start_new_session=True,
                    close_fds=True,
                )
        except OSError as e:
            for fd in (to_child_w, from_child_r):
                os.close(fd)
            raise SandboxError(f"could not start bwrap: {e}") from e
        finally:
            for fd in (to_child_r, from_child_w):
                os.close(fd)
            log.close()
        self._client = RunnerClient(
            PipeChannel(to_child_w, from_child_r), grace_s=self.config.grace_s
        )
        try:
            self._client.wait_ready(self.config.start_timeout_s)
        except RunnerLost as e:
            detail = self._log_tail()
            self._stop_runner()
            raise SandboxError(f"the sandbox did not start: {e}; {detail}") from e
        self._apply_task()

    def _apply_task(self) -> None:
        assert self._client is not None
        try:
            for f in self.spec.files:
                self._client.put_file(f.path, f.content())
        except ValueError as e:
            raise SetupError(str(e)) from e
        except RunnerLost as e:
            self._stop_runner()
            raise SandboxError(f"writing the task's files failed: {e}") from e
        if not self.spec.setup_code:
            return
        limits = self.spec.limits
        timeout_s = max(limits.exec_timeout_s, 60.0)
        try:
            result = self._client.execute(self.spec.setup_code, timeout_s, limits.max_output_chars)
        except RunnerLost as e:
            note = self._lost(e, timeout_s, 0.0).note
            raise SetupError(f"setup_code: {note}") from e
        if not result.ok:
            parts = [result.error or "", result.stderr, result.stdout]
            raise SetupError("setup_code failed:\n" + "\n".join(p for p in parts if p).strip())

    def _lost(self, error: RunnerLost, timeout_s: float, duration_s: float) -> ExecResult:
        closing = self._closed
        timed_out = isinstance(error, RunnerDeadline)
        returncode = self._stop_runner(wait_s=0 if timed_out or closing else 1.0)
        if closing:
            note = "The sandbox was closed while the code was running."
        elif timed_out:
            note = (
                f"The execution did not stop within {timeout_s:g}s and the sandbox was "
                f"restarted: {_LOST}."
            )
        else:
            note = self._death_note(returncode)
        return ExecResult(timed_out=timed_out, state_lost=True, note=note, duration_s=duration_s)

    def _death_note(self, returncode: int | None) -> str:
        memory_mb = self.spec.sandbox.memory_mb
        log = self._log_tail()
        oom_killed = (
            self.cgroups is not None
            and self._root is not None
            and (self.cgroups.oom_killed(self._root.name))
        )
        if returncode == RUNNER_EXIT_OUT_OF_MEMORY or "out of memory" in log or oom_killed:
            why = f"ran out of memory (limit {memory_mb} MB)"
        elif returncode in (-signal.SIGKILL, 128 + signal.SIGKILL):
            why = f"was killed, most likely for running out of memory (limit {memory_mb} MB)"
        elif returncode in (-signal.SIGXCPU, 128 + signal.SIGXCPU):
            why = "used up its CPU time limit"
        elif returncode is not None and (returncode < 0 or returncode > 128):
            signum = -returncode if returncode < 0 else returncode - 128
            why = f"crashed ({_signal_name(signum)})"
        else:
            why = f"exited unexpectedly (status {returncode})"
        return f"The sandbox's Python process {why} and was restarted: {_LOST}."

    def _stop_runner(self, wait_s: float = 0.0) -> int | None:
        """Kill the runner (after ``wait_s`` for one that is exiting by itself, so its real
        exit status is seen), reap it, drop the channel; return its exit status."""
        proc, client = self._proc, self._client
        self._client = None
        returncode = None
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                returncode = proc.wait(timeout=wait_s) if wait_s else None
            if returncode is None:
                _kill_sandbox(proc)
                returncode = proc.returncode
        if client is not None:
            client.close()
        return returncode

    def _teardown(self) -> None:
        if self._torn_down:
            return
        self._torn_down = True
        self._stop_runner()
        self._proc = None
        if self._root is not None:
            if self._cgroup_procs and self.cgroups is not None:
                self.cgroups.remove(self._root.name)
            bwrap_dirs.remove_root(self._root)

    # -- host-side setup ----------------------------------------------------------------

    def _make_root(self) -> Path:
        """``<tmp>/actfleet-bwrap-<owner>-*/`` holding ``work/`` (a tmpfs owned by the
        sandbox uid, where this process may mount) and the runner's log. The read-only files
        every sandbox sees alike (the runner, ``passwd``, ``group``) are made once per
        process: ``_shared_files``."""
        cfg = self.config
        try:
            root = bwrap_dirs.make_root(cfg.base_dir)
            root.chmod(0o755)
            work = root / "work"
            work.mkdir(mode=0o700)
            if cfg.separate_uids:
                os.chown(work, self.host_uid, self.host_uid)
            self._work_mounted = bwrap_dirs.mount_work(
                work, cfg.work_mb, cfg.work_files, self.host_uid, host=cfg.mount_work
            )
        except OSError as e:
            raise SandboxError(f"could not prepare the sandbox directory: {e}") from e
        return root

    def _command(self) -> list[str]:
        assert self._root is not None
        cfg = self.config
        memory_bytes = self.spec.sandbox.memory_mb * 1024 * 1024
        cpu_s = _cpu_s(self.spec)
        prlimit = [
            _which(cfg.prlimit),
            f"--as={memory_bytes}",
            f"--cpu={cpu_s}",
            f"--nproc={cfg.nproc}",
            f"--fsize={cfg.fsize_mb * 1024 * 1024}",
            f"--nofile={cfg.nofile}",
            "--core=0",
            "--",
        ]
        tmpfs_bytes = str(cfg.tmpfs_mb * 1024 * 1024)
        root = str(self._root)
        shared = _shared_files(cfg)
        args = [_which(cfg.bwrap), "--unshare-all", "--unshare-user", "--disable-userns"]
        if self.spec.sandbox.network:  # the provider allowed it (start() checked)
            args.append("--share-net")
        args += ["--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID)]
        args += ["--die-with-parent", "--new-session", "--hostname", "sandbox"]
        args += ["--ro-bind", "/usr", "/usr"]
        for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
            if os.path.islink(top):
                args += ["--symlink", os.readlink(top), top]
            elif os.path.isdir(top):
                args += ["--ro-bind", top, top]
        python = os.path.realpath(cfg.python)
        if not python.startswith("/usr/"):
            prefix = os.path.dirname(os.path.dirname(python))
            args += ["--ro-bind", prefix, prefix]
        for name in _ETC_FILES:
            args += ["--ro-bind-try", f"/etc/{name}", f"/etc/{name}"]
        args += ["--ro-bind", f"{shared}/passwd", "/etc/passwd"]
        args += ["--ro-bind", f"{shared}/group", "/etc/group"]
        args += ["--proc", "/proc", "--dev", "/dev"]
        args += ["--size", tmpfs_bytes, "--tmpfs", "/tmp"]
        args += ["--size", tmpfs_bytes, "--tmpfs", "/dev/shm"]
        args += ["--ro-bind", f"{shared}/runner.py", SANDBOX_RUNNER_PATH]
        if self._work_mounted:
            args += ["--bind", f"{root}/work", SANDBOX_WORK_DIR]
        else:
            work_bytes = str(cfg.work_mb * 1024 * 1024)
            args += ["--size", work_bytes, "--perms", "0700", "--tmpfs", SANDBOX_WORK_DIR]
        args += ["--chdir", SANDBOX_WORK_DIR]
        args += ["--remount-ro", "/"]
        args += ["--clearenv"]
        for key, value in (
            ("PATH", "/usr/local/bin:/usr/bin:/bin"),
            ("HOME", SANDBOX_WORK_DIR),
            ("LANG", "C.UTF-8"),
            ("TMPDIR", "/tmp"),
            ("PYTHONDONTWRITEBYTECODE", "1"),
            ("PYTHONUNBUFFERED", "1"),
        ):
            args += ["--setenv", key, value]
        args += ["--", cfg.python, "-I", "-B", SANDBOX_RUNNER_PATH]
        # Untrusted code yields the CPU to the worker that drives it: a sandbox starting (or
        # spinning) must not starve the model calls and stream writes of other tasks.
        prlimit = [_which("nice"), "-n", str(cfg.nice), *prlimit]
        if not cfg.separate_uids:
            return self._in_cgroups(prlimit + args)
        # Drop to the sandbox's own host uid with setpriv rather than Popen(user=...): asking
        # Popen to change ids rules out vfork, and a full fork() of a worker running a hundred
        # threads costs milliseconds of CPU under the GIL for every sandbox started.
        uid = str(self.host_uid)
        setpriv = [_which("setpriv"), f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--"]
        return self._in_cgroups(setpriv + prlimit + args)

    def _in_cgroups(self, command: list[str]) -> list[str]:
        """The command, run inside this sandbox's cgroups (memory for all its processes
        together, and a pids cap) when the host has them; made at the first start."""
        if self.cgroups is None or self._root is None:
            return command
        if not self._cgroup_procs:
            memory = self.spec.sandbox.memory_mb * 1024 * 1024
            self._cgroup_procs = self.cgroups.create(self._root.name, memory, self.config.nproc)
        procs = self._cgroup_procs
        cpu = self.cgroups.cpu
        if cpu is not None:
            procs = [*procs, cpu.warm if self._waiting else cpu.busy]
        return join_command(procs, command)

    def _log_tail(self) -> str:
        if self._root is None:
            return ""
        try:
            with open(self._root / "runner.log", "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(f.tell() - 2000, 0))
                return f.read().decode("utf-8", "replace").strip()
        except OSError:
            return ""


def _kill_sandbox(proc: subprocess.Popen[bytes]) -> None:
    """Kill everything in the sandbox and reap the outer ``bwrap``.

    SIGKILL goes first to the outer bwrap's child, the init of the sandbox's pid namespace:
    the kernel then kills every process inside and the init dies only once they are gone;
    the outer bwrap reaps it and exits, and we reap the outer bwrap. Killing the outer one
    first would orphan the init. Nothing is signalled once ``proc`` is reaped (its pid
    could be reused)."""
    if proc.returncode is not None:
        return
    for child in _children(proc.pid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(child, signal.SIGKILL)
    if not _exited_within(proc, 2.0):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _exited_within(proc: subprocess.Popen[bytes], timeout_s: float) -> bool:
    """Whether ``proc`` exits within ``timeout_s``, woken by its pidfd the moment it does
    (``Popen.wait(timeout)`` polls with sleeps that add milliseconds to every close)."""
    try:
        fd = os.pidfd_open(proc.pid)
    except OSError:  # gone already, or no pidfd on this kernel
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return False
        return True
    try:
        if proc.poll() is not None:  # reaped meanwhile: the fd may name a newer process
            return True
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(timeout_s * 1000))
    finally:
        os.close(fd)


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


_shared: dict[tuple[Path, str | None], Path] = {}
_shared_lock = threading.Lock()


def _shared_files(config: BwrapConfig) -> Path:
    """This process's ``<tmp>/actfleet-bwrap-shared-*/``: a copy of the runner (a stable
    file, whatever happens to the source tree meanwhile) and the sandbox's ``passwd`` and
    ``group``, mounted read-only into every sandbox. Made at the first start, removed at
    exit; writing them once instead of per sandbox saves a millisecond of the worker's CPU
    on each start."""
    key = (config.runner_path, config.base_dir)
    with _shared_lock:
        found = _shared.get(key)
        if found is not None and found.is_dir():
            return found
        try:
            path = bwrap_dirs.shared_dir(config.base_dir)
            path.chmod(0o755)
            shutil.copyfile(config.runner_path, path / "runner.py")
            (path / "passwd").write_text(
                f"root:x:0:0:root:/root:/bin/sh\nsandbox:x:{SANDBOX_UID}:{SANDBOX_UID}:"
                f"sandbox:{SANDBOX_WORK_DIR}:/bin/sh\n"
            )
            (path / "group").write_text(f"root:x:0:\nsandbox:x:{SANDBOX_UID}:\n")
            for name in ("runner.py", "passwd", "group"):
                (path / name).chmod(0o644)
        except OSError as e:
            raise SandboxError(f"could not prepare the sandboxes' shared files: {e}") from e
        atexit.register(shutil.rmtree, path, ignore_errors=True)
        _shared[key] = path
        return path


@functools.cache
def _which(program: str) -> str:
    path = shutil.which(program)  # cached: a PATH walk costs a sandbox start 0.4 ms each
    if path is None:
        raise SandboxError(f"{program} is not installed (the bwrap backend needs it)")
    return path


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
