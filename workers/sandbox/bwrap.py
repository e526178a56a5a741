"""The bubblewrap sandbox backend: one runner process per task, no container engine needed.

Two ways to start a sandbox, with the same isolation and limits:

- forked (the default where the host allows it, ``ACTFLEET_BWRAP_ZYGOTE``): each provider
  keeps one zygote, ``runner.py --zygote`` started under the classic command below (but
  for nested user namespaces, which its children need), and each sandbox is a fork of it
  that makes its own user, mount, pid, net, ipc, uts and cgroup namespaces, its own
  ``/work``, ``/tmp``, ``/dev/shm``, ``/dev/pts`` and ``/proc``, and joins its cgroups
  before it runs anything (``zygote.py`` says how, and what two siblings share: nothing
  but the zygote's one host uid, whose role the pids cgroup takes). It costs the worker
  ~1.5 ms of CPU to start instead of ~10-20: no shell, no execs, no interpreter start.
  ``/work`` then lives in the sandbox's mount namespace only (``work_dir`` is None) and is
  empty again after a restart of its runner. Tasks that ask for network, hosts without
  writable cgroups or user namespaces, and any failure to start the zygote (said once in
  the log) take the classic path.
- classic: ``[join cgroups] setpriv <uid> nice prlimit <rlimits> bwrap <namespaces>
  python3 runner.py``:

- namespaces: ``--unshare-all`` (no network, own pid/ipc/uts/cgroup namespaces) plus a user
  namespace in which the code runs as uid 65534 with no capabilities; ``--die-with-parent``
  and ``--new-session``; nested user namespaces are disabled.
- files: ``/usr`` (and the ``/bin``, ``/lib*`` links), a few ``/etc`` files and the runner
  are mounted read-only; ``/work`` (the cwd) is a tmpfs of ``work_mb`` and at most
  ``work_files`` files (``bwrap_dirs``: on the sandbox's private host folder when the worker
  may mount, else inside the sandbox); ``/tmp`` and ``/dev/shm`` are small tmpfs; minimal
  ``/proc``, ``/dev``. A worker that starts clears the folders of dead ones
  (``BwrapProvider.start_housekeeping``).
- environment: cleared, then ``PATH``, ``HOME=/work``, ``LANG``, ``TMPDIR``,
  ``PYTHONDONTWRITEBYTECODE``, ``PYTHONUNBUFFERED`` only: no secret reaches the sandbox.
- caps: a task asking for more ``memory_mb`` or ``cpus`` than the server's caps is refused
  (``SandboxRefused``; the API refuses it first, ``caps.refusal``).
- limits (``prlimit``; a forked runner sets the same ones itself): address space =
  ``spec.sandbox.memory_mb``, CPU seconds, processes, file size, open files, no core dumps.
  When the worker runs as root, each classic sandbox runs under its own host uid so
  ``RLIMIT_NPROC`` bounds that sandbox only (a fork bomb stays inside; the kernel does not
  apply ``RLIMIT_NPROC`` to host root); forked ones share the zygote's host uid, and are
  kept apart by their pids cgroups and by the kernel counting ``RLIMIT_NPROC`` per user
  namespace.
- cgroups (``cgroups.py``, where v1 memory and pids are writable): ``memory_mb`` and the
  process cap hold for all of the sandbox's processes together; where v1 cpu is writable
  too, pool sandboxes start, and finished ones die, in a low-weight CPU group (refills and
  teardowns yield to the workers); a task's sandbox runs in a group that weighs, for all of
  them together, one worker thread.
- the network, when the server allows it and the task asks: ``--share-net``.

A sandbox whose code would not stop, ran out of memory or crashed is killed; the next
``execute`` starts a fresh runner and re-applies the task's files and ``setup_code``
(``session.Session``, shared with the Docker backend, says every outcome).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import functools
import itertools
import os
import resource
import select
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from agent.errors import SandboxError, SandboxRefused
from agent.models import TaskSpec
from agent.sandbox import PoolStats
from workers.sandbox import bwrap_dirs
from workers.sandbox.caps import refusal
from workers.sandbox.cgroups import Cgroups, join_command
from workers.sandbox.launch import LaunchGate
from workers.sandbox.pool import WarmPool
from workers.sandbox.protocol import DEFAULT_GRACE_S, PipeChannel, RunnerLost, SessionClient
from workers.sandbox.session import DEFAULT_SETUP_TIMEOUT_S, Box, Exit, Session
from workers.sandbox.zygote import ChildLimits, Zygote, ZygoteBox, ZygoteUnavailable

log = structlog.get_logger(__name__)

RUNNER_PATH = Path(__file__).resolve().parents[2] / "sandbox_images" / "python" / "runner.py"
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
# Runners this process starts at once, pool and tasks together, a task's first (``launch``).
LAUNCH_SLOTS = max(2, os.cpu_count() or 1)
_LAUNCHES = LaunchGate(LAUNCH_SLOTS)
ZYGOTE_NOFILE = 65_536  # at most (the worker's hard limit): a status pipe per live sandbox
_HOST_UID_BASE = 600_000  # host uids for sandboxes when running as root
_HOST_UID_SPAN = 100_000
_uid_counter = itertools.count()


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
    setup_timeout_s: float
    nproc: int
    fsize_mb: int
    nofile: int
    tmpfs_mb: int
    work_mb: int
    work_files: int
    mount_work: bool
    separate_uids: bool
    nice: int
    zygote: bool = True


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
        setup_timeout_s: float = DEFAULT_SETUP_TIMEOUT_S,
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
        zygote: bool = True,
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
            setup_timeout_s=setup_timeout_s,
            nproc=nproc,
            fsize_mb=fsize_mb,
            nofile=nofile,
            tmpfs_mb=tmpfs_mb,
            work_mb=work_mb,
            work_files=work_files,
            mount_work=mount_work,
            separate_uids=(os.geteuid() == 0) if separate_uids is None else separate_uids,
            nice=nice,
            zygote=zygote,
        )
        self._pool: WarmPool[BwrapSandbox] | None = None
        self.allow_network = allow_network
        self.max_memory_mb = max_memory_mb
        self.max_cpus = max_cpus
        self._cgroups: Cgroups | bool | None = use_cgroups  # True: detect at first start
        self._cgroups_lock = threading.Lock()
        self._pool_sizes = (pool_min_size, pool_max_size, pool_idle_ttl_s, pool_max_age_s)
        self._zygote: Zygote | None = None

    def start(self, spec: TaskSpec, task_id: str = "") -> BwrapSandbox:
        """A ready sandbox with ``spec.files`` written and ``spec.setup_code`` run: a warm
        one from the pool when the task's limits are the pool's, else a new one.

        Raises as ``agent.sandbox.SandboxProvider.start`` says.
        """
        refused = refusal(spec.sandbox, self.allow_network, self.max_memory_mb, self.max_cpus)
        if refused:
            raise SandboxRefused(refused)
        pool = self._pool
        warm = pool.acquire() if pool is not None and _limits(spec) == _limits(_POOLED) else None
        sandbox = warm or BwrapSandbox(
            self.config, spec, task_id, self.cgroups(), zygote=self.zygote()
        )
        try:
            if warm is not None:
                warm.adopt(spec, task_id)
            else:
                sandbox.prepare()
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
            sandbox = BwrapSandbox(
                self.config, _POOLED, "", self.cgroups(), pooled=True, zygote=self.zygote()
            )
            sandbox.prepare()
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

    def zygote(self) -> Zygote | None:
        """This provider's fork server (``zygote.py``), made at the first start; None when
        turned off or without writable cgroups (the child must join them before it runs)."""
        if not self.config.zygote:
            return None
        cgroups = self.cgroups()
        with self._cgroups_lock:
            if self._zygote is None:
                if cgroups is None:
                    log.info("sandbox.zygote_unavailable", reason="no writable cgroups")
                    self.config = dataclasses.replace(self.config, zygote=False)
                    return None
                config = self.config
                self._zygote = Zygote(
                    functools.partial(_zygote_command, config),
                    cgroups,
                    lambda: _shared_files(config) / "zygote.log",
                    config.start_timeout_s,
                )
            return self._zygote

    def pool_stats(self) -> PoolStats:
        pool = self._pool
        return pool.stats() if pool is not None else PoolStats()

    def start_housekeeping(self, is_worker_alive: Callable[[str], bool]) -> int:
        """Remove the host folders of dead processes' sandboxes (``bwrap_dirs.clear_stale``:
        the kernel's locks tell the dead, whatever ``is_worker_alive`` says); once, at start:
        a folder is left behind only by a process that died, and every worker clears them
        when it starts."""
        removed = bwrap_dirs.clear_stale(self.config.base_dir)
        log.info("sandbox.reaped", backend=self.backend, folders=len(removed))
        return len(removed)

    def close(self) -> None:
        """Stop the pool and kill its idle runners. Idempotent."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        if self._zygote is not None:
            self._zygote.close()


_POOLED = TaskSpec(prompt="")


def _limits(spec: TaskSpec) -> tuple[int, int, bool]:
    """What a runner process is started with (rlimits, network): the pool's key."""
    return spec.sandbox.memory_mb, _cpu_s(spec), spec.sandbox.network


def _cpu_s(spec: TaskSpec) -> int:
    return int(max(2 * spec.limits.timeout_s, 60))


class BwrapSandbox(Session):
    """One task's session (``session.Session``): a runner process under bubblewrap, in a
    host folder (``root``) that outlives the runner, so a restart keeps ``/work`` when it
    is mounted on the host."""

    backend = "bwrap"

    def __init__(
        self,
        config: BwrapConfig,
        spec: TaskSpec,
        task_id: str,
        cgroups: Cgroups | None = None,
        *,
        pooled: bool = False,
        zygote: Zygote | None = None,
    ) -> None:
        super().__init__(spec, task_id, setup_timeout_s=config.setup_timeout_s)
        self.config = config
        self.cgroups = cgroups
        self._zygote = zygote
        self._cgroup_procs: list[Path] = []
        self._waiting = pooled  # started ahead of demand, no task yet: low CPU weight
        self._root: Path | None = None
        self._work_mounted = False  # /work is a tmpfs on the host folder (else in bwrap)
        self.host_uid = _next_host_uid() if config.separate_uids else os.geteuid()

    # -- public -------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """The host pid of the outer process (``bwrap``, or the zygote's child); its
        descendants are the rest."""
        box = self._box
        if isinstance(box, ZygoteBox):
            return box.pid
        return box.proc.pid if isinstance(box, _BwrapBox) else None

    @property
    def forked(self) -> bool:
        """Whether the current runner is a zygote's child (else classic bwrap)."""
        return isinstance(self._box, ZygoteBox)

    @property
    def cgroup_name(self) -> str:
        return self._root.name if self._root is not None else ""

    @property
    def work_dir(self) -> Path | None:
        """The host directory mounted at ``/work`` inside the sandbox (None when ``/work``
        exists inside the sandbox only)."""
        return self._root / "work" if self._root and self._work_mounted else None

    @property
    def root(self) -> Path | None:
        """The sandbox's host folder (``<tmp>/actfleet-bwrap-<owner>-*``)."""
        return self._root

    def adopt(self, spec: TaskSpec, task_id: str) -> None:
        """Give a pooled sandbox (started for ``_POOLED``) to a task: write its files and
        run its setup_code, as ``prepare`` does for a new one."""
        if self.closed or self._box is None:
            raise SandboxError("the pooled sandbox is gone")
        self.spec, self.task_id, self.pool_hit = spec, task_id, True
        self._waiting = False
        self._move_cpu_group(busy=True)
        self.prepare()

    def alive(self) -> bool:
        box = self._box
        if isinstance(box, ZygoteBox):
            return not self.closed and box.alive()
        return not self.closed and isinstance(box, _BwrapBox) and box.proc.poll() is None

    def close(self) -> None:
        """Kill the whole process tree and remove the work dir. Idempotent, thread-safe."""
        if not self.closed:
            self._move_cpu_group(busy=False)  # its processes' exits yield to live tasks
        super().close()

    def _move_cpu_group(self, busy: bool) -> None:
        cgroups, root = self.cgroups, self._root
        if cgroups is None or cgroups.cpu is None or root is None or not self.alive():
            return
        cgroups.cpu.move(cgroups.members(root.name), cgroups.cpu.busy if busy else cgroups.cpu.warm)

    # -- runner lifecycle (called with the session's lock held) -------------------------

    def _launch(self) -> Box:
        with _LAUNCHES.slot(urgent=not self._waiting):  # a pool refill waits for tasks
            return self._launch_now()

    def _launch_now(self) -> Box:
        if self._root is None:
            self._root = self._make_root()
        forked = self._launch_forked()
        if forked is not None:
            return forked
        log = open(self._root / "runner.log", "ab")  # noqa: SIM115 (the child keeps it)
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        try:
            proc = subprocess.Popen(
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
        client = SessionClient(PipeChannel(to_child_w, from_child_r), grace_s=self.config.grace_s)
        box = _BwrapBox(proc, client, self)
        try:
            client.wait_ready(self.config.start_timeout_s)
        except RunnerLost as e:
            box.stop(0)
            raise SandboxError(f"the sandbox did not start: {e}; {self._log_tail()}") from e
        return box

    def _launch_forked(self) -> ZygoteBox | None:
        """A runner forked by the provider's zygote; None (after saying why, once) when
        the zygote cannot serve this sandbox: the caller takes the classic path."""
        zygote, root, cfg = self._zygote, self._root, self.config
        if zygote is None or root is None or not self._forks():
            return None
        log_fd = os.open(root / "runner.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            child = zygote.spawn(self._child_limits(), log_fd, self._start_cgroups())
        except ZygoteUnavailable as e:
            zygote.fall_back(str(e))
            return None
        finally:
            os.close(log_fd)
        client = SessionClient(PipeChannel(child.to_runner, child.from_runner), grace_s=cfg.grace_s)
        box = ZygoteBox(child, client, self)
        try:
            client.wait_ready(cfg.start_timeout_s)
        except RunnerLost as e:
            box.stop(0)
            if not zygote.proven:  # its very first child failed: this host cannot do it
                zygote.close()
                zygote.broken = f"its first sandbox did not start: {e}; {self._log_tail()}"
                zygote.fall_back(zygote.broken)
                return None
            raise SandboxError(f"the sandbox did not start: {e}; {self._log_tail()}") from e
        zygote.proven = True
        return box

    def _forks(self) -> bool:
        """Whether this sandbox's runner is to be a zygote's child: there is a zygote that
        has not failed for good, cgroups to put the child in, and no network asked for."""
        zygote = self._zygote
        return (
            zygote is not None
            and zygote.broken is None
            and self.cgroups is not None
            and not self.spec.sandbox.network
        )

    def _child_limits(self) -> ChildLimits:
        cfg = self.config
        return ChildLimits(
            memory_bytes=self.spec.sandbox.memory_mb * 1024 * 1024,
            cpu_s=_cpu_s(self.spec),
            nproc=cfg.nproc,
            fsize_bytes=cfg.fsize_mb * 1024 * 1024,
            nofile=cfg.nofile,
            work_bytes=cfg.work_mb * 1024 * 1024,
            work_files=cfg.work_files,
            tmpfs_bytes=cfg.tmpfs_mb * 1024 * 1024,
        )

    def _oom_killed(self) -> bool:
        root = self._root
        if "out of memory" in self._log_tail():
            return True
        return self.cgroups is not None and root is not None and self.cgroups.oom_killed(root.name)

    def _teardown(self) -> None:
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
                work,
                cfg.work_mb,
                cfg.work_files,
                self.host_uid,
                host=cfg.mount_work and not self._forks(),  # else in the child's namespace
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
        if self._work_mounted:
            work = ["--bind", f"{self._root}/work", SANDBOX_WORK_DIR]
        else:
            work_bytes = str(cfg.work_mb * 1024 * 1024)
            work = ["--size", work_bytes, "--perms", "0700", "--tmpfs", SANDBOX_WORK_DIR]
        args = _bwrap_args(cfg, work, network=self.spec.sandbox.network, nested_userns=False)
        args += ["--", cfg.python, "-I", "-B", SANDBOX_RUNNER_PATH]
        return self._in_cgroups(_as_sandbox_user(cfg, self.host_uid, prlimit + args))

    def _in_cgroups(self, command: list[str]) -> list[str]:
        """The command, run inside this sandbox's cgroups (memory for all its processes
        together, and a pids cap) when the host has them; made at the first start."""
        if self.cgroups is None or self._root is None:
            return command
        return join_command(self._start_cgroups(), command)

    def _start_cgroups(self) -> list[Path]:
        """The ``cgroup.procs`` files a runner starts in: this sandbox's memory and pids
        groups (made at the first start) and the CPU group for now."""
        assert self.cgroups is not None and self._root is not None
        if not self._cgroup_procs:
            memory = self.spec.sandbox.memory_mb * 1024 * 1024
            self._cgroup_procs = self.cgroups.create(self._root.name, memory, self.config.nproc)
        procs = self._cgroup_procs
        cpu = self.cgroups.cpu
        if cpu is not None:
            procs = [*procs, cpu.warm if self._waiting else cpu.busy]
        return procs

    def _log_tail(self) -> str:
        return bwrap_dirs.log_tail(self._root / "runner.log") if self._root else ""


def _bwrap_args(
    cfg: BwrapConfig, work: list[str], *, network: bool, nested_userns: bool
) -> list[str]:
    """bwrap and its options, up to the command: the sandbox's namespaces, mounts (``work``
    says how ``/work`` is mounted) and environment."""
    tmpfs_bytes = str(cfg.tmpfs_mb * 1024 * 1024)
    shared = _shared_files(cfg)
    args = [_which(cfg.bwrap), "--unshare-all", "--unshare-user"]
    if not nested_userns:
        args.append("--disable-userns")
    if network:  # the provider allowed it (start() checked)
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
    args += work
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
    return args


def _next_host_uid() -> int:
    """A host uid of its own for a sandbox (or a zygote) of a worker running as root."""
    return _HOST_UID_BASE + (os.getpid() * 1009 + next(_uid_counter)) % _HOST_UID_SPAN


def _as_sandbox_user(cfg: BwrapConfig, host_uid: int, command: list[str]) -> list[str]:
    """``command`` niced, and run as ``host_uid`` when the worker is root."""
    # Untrusted code yields the CPU to the worker that drives it: a sandbox starting (or
    # spinning) must not starve the model calls and stream writes of other tasks.
    command = [_which("nice"), "-n", str(cfg.nice), *command]
    if not cfg.separate_uids:
        return command
    # Drop to the sandbox's own host uid with setpriv rather than Popen(user=...): asking
    # Popen to change ids rules out vfork, and a full fork() of a worker running a hundred
    # threads costs milliseconds of CPU under the GIL for every sandbox started.
    uid = str(host_uid)
    setpriv = [_which("setpriv"), f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--"]
    return setpriv + command


def _zygote_command(cfg: BwrapConfig, control_fd: int) -> list[str]:
    """The zygote (``runner.py --zygote``) under the sandboxes' bwrap command, but for
    nested user namespaces (each child makes its own) and ``/work`` (each mounts its own).
    Its rlimits leave room for its children's: a child may lower a limit, never raise it,
    and the kernel counts processes per user namespace against the limit the namespace's
    creator had (so the zygote's ``RLIMIT_NPROC`` must not be a sandbox's)."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nofile = ZYGOTE_NOFILE if hard == resource.RLIM_INFINITY else min(hard, ZYGOTE_NOFILE)
    prlimit = [_which(cfg.prlimit), f"--nofile={nofile}", "--core=0", "--"]  # before setpriv
    args = _bwrap_args(cfg, ["--dir", SANDBOX_WORK_DIR], network=False, nested_userns=True)
    args += ["--", cfg.python, "-I", "-B", SANDBOX_RUNNER_PATH, "--zygote", str(control_fd)]
    return prlimit + _as_sandbox_user(cfg, _next_host_uid(), args)


class _BwrapBox:
    """One runner process tree (``session.Box``)."""

    def __init__(
        self, proc: subprocess.Popen[bytes], client: SessionClient, sandbox: BwrapSandbox
    ) -> None:
        self.proc = proc
        self.client = client
        self._sandbox = sandbox

    def stop(self, wait_s: float) -> Exit:
        returncode = None
        if wait_s:
            with contextlib.suppress(subprocess.TimeoutExpired):
                returncode = self.proc.wait(timeout=wait_s)
        if returncode is None:
            _kill_sandbox(self.proc)
        self.client.close()
        if not wait_s:
            return Exit()
        return Exit(self.proc.returncode, oom_killed=self._sandbox._oom_killed())

    def kill(self) -> None:
        _kill_sandbox(self.proc)

    def detail(self) -> str:
        return self._sandbox._log_tail()


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
