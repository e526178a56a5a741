"""The bubblewrap backend against hostile code: real bwrap, real processes, no mocks.

Every test runs twice: with sandboxes forked by the provider's zygote (the default) and
started the classic way (``zygote=False``); ``launch_path`` sets the default of every
``BwrapProvider`` made here. ``test_bwrap_zygote.py`` has what only the zygote has."""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.errors import SandboxRefused
from agent.models import TaskSpec
from workers.sandbox import bwrap_dirs
from workers.sandbox.bwrap import BwrapProvider, BwrapSandbox
from workers.sandbox.cgroups import BUSY_CPU_SHARES, WARM_CPU_SHARES, Cgroups

pytestmark = [
    pytest.mark.bwrap,
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed"),
]


def make_spec(**overrides: object) -> TaskSpec:
    return TaskSpec.from_dict({"prompt": "test", **overrides})


@pytest.fixture(autouse=True, params=["zygote", "classic"])
def launch_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Which way the tests' providers start sandboxes (the default of ``zygote=``)."""
    defaults = BwrapProvider.__init__.__kwdefaults__
    assert defaults is not None
    monkeypatch.setitem(defaults, "zygote", request.param == "zygote")
    return str(request.param)


def processes_of(sandbox: BwrapSandbox) -> set[tuple[int, str]]:
    """The sandbox's processes now, as (host pid, start time): its outer process and all
    below it, the members of its pids cgroup, and (classic, as root) every process of its
    private host uid."""
    pids = set(process_tree(sandbox.pid)) if sandbox.pid is not None else set()
    if sandbox.cgroups is not None and sandbox.root is not None:
        pids |= set(sandbox.cgroups.members(sandbox.root.name))
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        started = _started(int(entry.name))
        if started is None:
            continue
        ours = sandbox.host_uid != os.geteuid() and not sandbox.forked
        if int(entry.name) in pids or (ours and sandbox.host_uid in _uids(int(entry.name))):
            found.add((int(entry.name), started))
    return found


def still_running(processes: set[tuple[int, str]]) -> list[int]:
    """Those of ``processes`` that still run (a pid reused since does not count)."""
    return [pid for pid, started in processes if _started(pid) == started]


def _started(pid: int) -> str | None:
    """The process's start time, or None if it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return None if fields[0] == "Z" else fields[19]


def _uids(pid: int) -> set[int]:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return set()
    line = next(line for line in status.splitlines() if line.startswith("Uid:"))
    return {int(u) for u in line.split()[1:]}


def wait_for_pool(provider: BwrapProvider, idle: int) -> None:
    """Until the provider's warm pool holds ``idle`` runners (20 s at most)."""
    deadline = time.monotonic() + 20
    while provider.pool_stats().idle < idle and time.monotonic() < deadline:
        time.sleep(0.05)
    assert provider.pool_stats().idle == idle


@pytest.fixture
def provider() -> BwrapProvider:
    return BwrapProvider()  # base_dir must be reachable by the sandbox uid: not tmp_path


@pytest.fixture
def sandbox(provider: BwrapProvider) -> Iterator[BwrapSandbox]:
    sb = provider.start(make_spec(sandbox={"memory_mb": 256}), "test-task")
    yield sb
    sb.close()


def test_runs_as_an_unprivileged_user_in_the_work_dir_with_a_clean_env(
    sandbox: BwrapSandbox,
) -> None:
    result = sandbox.execute("import os\nos.getuid(), os.getcwd(), sorted(os.environ)", 5, 1000)
    assert result.value == (
        "(65534, '/work', ['HOME', 'LANG', 'PATH', 'PWD', 'PYTHONDONTWRITEBYTECODE', "
        "'PYTHONUNBUFFERED', 'TMPDIR'])"
    )


def test_the_work_dir_and_tmp_are_writable(sandbox: BwrapSandbox) -> None:
    result = sandbox.execute(
        "open('out.txt', 'w').write('ok')\nopen('/tmp/t', 'w').write('ok')", 5, 1000
    )
    assert result.ok
    assert sandbox.execute("open('/work/out.txt').read()", 5, 1000).value == "'ok'"
    if sandbox.forked:  # its /work is in its own mount namespace only
        assert sandbox.work_dir is None
    else:
        assert sandbox.work_dir is not None
        assert (sandbox.work_dir / "out.txt").read_text() == "ok"


def test_a_fork_bomb_is_contained_and_the_host_still_forks(sandbox: BwrapSandbox) -> None:
    result = sandbox.execute(
        "import os, time\n"
        "n = 0\n"
        "try:\n"
        "    while True:\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(60)\n"
        "            os._exit(0)\n"
        "        n += 1\n"
        "except OSError as e:\n"
        "    print('fork refused after', n, e.strerror)",
        10,
        1000,
    )
    assert "fork refused after" in result.stdout
    assert int(result.stdout.split()[3]) < 200
    assert subprocess.run(["true"], check=False).returncode == 0
    assert sandbox.execute("1 + 1", 5, 1000).value == "2"


def test_a_real_fork_bomb_is_contained_and_cleaned_up_on_close(provider: BwrapProvider) -> None:
    sb = provider.start(make_spec(), "t")
    result = sb.execute(
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
        2,
        1000,
    )
    assert result.timed_out
    assert subprocess.run(["true"], check=False).returncode == 0
    bomb = processes_of(sb)
    sb.close()
    assert still_running(bomb) == []


def test_a_memory_hog_gets_a_memory_error_that_names_the_limit(sandbox: BwrapSandbox) -> None:
    result = sandbox.execute("hog = []\nwhile True:\n    hog.append(bytearray(10**7))", 30, 1000)
    assert result.error is not None
    assert "MemoryError" in result.error
    assert "out of memory (limit 256 MB)" in result.error
    assert not result.state_lost
    assert sandbox.execute("del hog\nsum(range(10))", 5, 1000).value == "45"


def test_close_leaves_no_process_and_no_work_dir_behind(provider: BwrapProvider) -> None:
    sb = provider.start(make_spec(), "t")
    sb.execute("import subprocess\nsubprocess.Popen(['sleep', '300'])", 5, 1000)
    running, root = processes_of(sb), sb.root
    assert len(running) >= 4  # outer process, the namespace's init, the runner, the sleep

    sb.close()
    sb.close()  # idempotent

    assert still_running(running) == []
    assert root is not None and not root.exists()


def test_a_warm_pool_serves_tasks_with_default_limits_and_cold_starts_the_rest() -> None:
    # Given a provider with a warm pool of two runners
    provider = BwrapProvider(pool_min_size=2, pool_max_size=2)
    provider.start_pool()
    try:
        wait_for_pool(provider, 2)
        # When a task with default limits starts, it gets a warm runner with its own files
        # and setup_code applied
        content = base64.b64encode(b"42").decode()
        spec = make_spec(
            files=[{"path": "n.txt", "content_b64": content}], setup_code="TOOL = 'ready'"
        )
        warm = provider.start(spec, "warm-task")
        assert warm.pool_hit
        result = warm.execute("print(open('n.txt').read(), TOOL)", 5, 1000)
        assert result.stdout.strip() == "42 ready"
        # and a task that asks for other limits gets a runner started for it
        cold = provider.start(make_spec(sandbox={"memory_mb": 128}), "cold-task")
        assert not cold.pool_hit
        big = cold.execute("b = bytearray(200 * 1024 * 1024)", 5, 1000)
        assert big.error is not None and "MemoryError" in big.error
        running = processes_of(warm) | processes_of(cold)
        warm.close()
        cold.close()
        assert still_running(running) == []
    finally:
        provider.close()
    # Then closing the provider leaves none of the pool's runners behind
    assert provider.pool_stats().idle == 0


def test_network_is_given_only_when_the_server_allows_it() -> None:

    from agent.errors import SandboxRefused

    # Given a service listening on the host's loopback
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    connect = (
        f"import socket\nsocket.create_connection(('127.0.0.1', {port}), 2).close()\nprint('ok')"
    )
    wants = make_spec(sandbox={"network": True})
    try:
        # When the server does not allow network, a task that asks for it is refused
        with pytest.raises(SandboxRefused):
            BwrapProvider().start(wants, "t")
        # and a task that does not ask cannot connect
        with BwrapProvider().start(make_spec(), "t") as sb:
            assert sb.execute(connect, 5, 1000).error is not None
        # When it allows network, the task that asks can connect
        with BwrapProvider(allow_network=True).start(wants, "t") as sb:
            assert sb.execute(connect, 5, 1000).stdout.strip() == "ok"
    finally:
        server.close()


@pytest.mark.skipif(
    BwrapProvider().cgroups() is None, reason="needs writable cgroup v1 memory and pids"
)
def test_the_memory_limit_holds_for_all_of_a_sandboxs_processes_together() -> None:
    # Given a 256 MB sandbox, whose rlimits alone allow each process 256 MB of address space
    provider = BwrapProvider()
    cgroups = provider.cgroups()
    assert cgroups is not None
    sb = provider.start(make_spec(sandbox={"memory_mb": 256}), "t")
    assert sb.root is not None
    name = sb.root.name
    # When five processes each take 70 MB at once (350 MB in all)
    code = textwrap.dedent(
        """
        import os, time
        kids = []
        for _ in range(5):
            pid = os.fork()
            if pid == 0:
                b = bytearray(70 << 20)
                time.sleep(2)
                os._exit(0)
            kids.append(pid)
        print(sum(os.WIFSIGNALED(os.waitpid(k, 0)[1]) for k in kids))
        """
    )
    result = sb.execute(code, 20, 1000)
    # Then the kernel kills some of them, and the sandbox's cgroups go with it
    assert result.state_lost or int(result.stdout) >= 1
    assert cgroups.oom_killed(name)
    sb.close()
    assert not any((base / name).exists() for base in cgroups.bases.values())


def has_cpu_groups() -> bool:
    cgroups = BwrapProvider().cgroups()
    return cgroups is not None and cgroups.cpu is not None


def members(procs: Path) -> set[int]:
    return {int(p) for p in procs.read_text().split()}


def shares(procs: Path) -> int:
    return int((procs.parent / "cpu.shares").read_text())


def process_tree(pid: int) -> list[int]:
    """``pid`` and every process under it, from /proc (not from the cgroups under test)."""
    found, pending = [], [pid]
    while pending:
        found.append(pending.pop())
        with contextlib.suppress(OSError):
            children = Path(f"/proc/{found[-1]}/task/{found[-1]}/children").read_text()
            pending += map(int, children.split())
    return found


@pytest.mark.skipif(not has_cpu_groups(), reason="needs writable cgroup v1 memory, pids and cpu")
def test_a_tasks_sandbox_and_all_it_starts_run_in_the_busy_cpu_group(
    provider: BwrapProvider,
) -> None:
    # Given a sandbox started for a task, whose code has started a process of its own
    cgroups = provider.cgroups()
    assert cgroups is not None and cgroups.cpu is not None
    sb = provider.start(make_spec(), "t")
    try:
        child = "import subprocess; p = subprocess.Popen(['sleep', '30']); print('ok')"
        assert sb.execute(child, 10, 1000).stdout.strip() == "ok"
        # Then the outer bwrap and everything under it (the runner, the sleep) are in the
        # busy group, which weighs as much as one worker thread
        assert sb.pid is not None
        pids = process_tree(sb.pid)
        assert len(pids) >= 4  # outer bwrap, the namespace's init, the runner, the sleep
        assert set(pids) <= members(cgroups.cpu.busy)
        assert not set(pids) & members(cgroups.cpu.warm)
        assert shares(cgroups.cpu.busy) == BUSY_CPU_SHARES
    finally:
        sb.close()


@pytest.mark.skipif(not has_cpu_groups(), reason="needs writable cgroup v1 memory, pids and cpu")
def test_a_pool_sandbox_starts_at_low_weight_and_moves_to_the_busy_group_when_taken() -> None:
    # Given a warm pool of one runner, started ahead of demand
    provider = BwrapProvider(pool_min_size=1, pool_max_size=1)
    cgroups = provider.cgroups()
    assert cgroups is not None and cgroups.cpu is not None
    provider.start_pool()
    try:
        wait_for_pool(provider, 1)
        waiting = members(cgroups.cpu.warm)
        # When a task takes it
        sb = provider.start(make_spec(), "t")
        try:
            assert sb.pool_hit and sb.pid is not None
            before = set(process_tree(sb.pid))
            # Then it had waited in the low-weight group, and is in the busy one now, with
            # whatever its code starts
            assert before <= waiting
            child = "import subprocess; p = subprocess.Popen(['sleep', '30']); print('ok')"
            assert sb.execute(child, 10, 1000).stdout.strip() == "ok"
            pids = set(process_tree(sb.pid))
            assert len(pids) == len(before) + 1
            assert pids <= members(cgroups.cpu.busy)
            assert not pids & members(cgroups.cpu.warm)
            assert shares(cgroups.cpu.warm) == WARM_CPU_SHARES
        finally:
            sb.close()
        # and the pool's next runner starts in the low-weight group
        wait_for_pool(provider, 1)
        assert members(cgroups.cpu.warm)
    finally:
        provider.close()


# -- the server's ceilings: /work's size and files, memory and CPU caps -------------------

FILL = textwrap.dedent(
    """
    import os
    MAX_FILES = 100_000
    written, err = 0, None
    try:
        with open('big.bin', 'wb') as f:
            while True:
                f.write(b'\\0' * (1 << 20))
                f.flush()
                written += 1 << 20
    except OSError as e:
        err = e.strerror
    os.remove('big.bin')
    made, err2 = 0, None
    try:
        while made < MAX_FILES:
            open(f'f{made}', 'w').close()
            made += 1
    except OSError as e:
        err2 = e.strerror
    (written >> 20, err, made, err2)
    """
)


@pytest.mark.skipif(os.geteuid() != 0, reason="a host tmpfs for /work needs mount rights")
def test_work_is_a_tmpfs_capped_in_size_and_in_files() -> None:
    # Given a server whose sandboxes get 16 MB and 200 files of /work
    provider = BwrapProvider(work_mb=16, work_files=200)
    with provider.start(make_spec(sandbox={"memory_mb": 256}), "t") as sb:
        # When the code writes until it cannot, then makes empty files until it cannot
        r = sb.execute(FILL, 60, 1000)
        assert r.error is None, r.error
        mb, err, made, err2 = eval(r.value or "")
        # Then both stop at the caps with "no space", on a tmpfs (not the host's disk)
        assert mb <= 16 and err == "No space left on device"
        assert made < 200 and err2 == "No space left on device"
        if not sb.forked:  # else it is in the sandbox's own mount namespace
            assert sb.work_dir is not None and os.path.ismount(sb.work_dir)
        root = sb.root
    assert root is not None and not root.exists()  # unmounted and removed on close


def test_work_is_size_capped_where_the_worker_may_not_mount() -> None:
    provider = BwrapProvider(work_mb=16, mount_work=False)
    with provider.start(make_spec(sandbox={"memory_mb": 256}), "t") as sb:
        r = sb.execute(FILL.replace("MAX_FILES = 100_000", "MAX_FILES = 50"), 60, 1000)
        assert r.error is None, r.error
        mb, err, made, _ = eval(r.value or "")
        assert mb <= 16 and err == "No space left on device" and made == 50
        assert sb.work_dir is None  # /work exists inside the sandbox only


def test_a_task_asking_for_more_than_the_servers_caps_is_refused() -> None:
    provider = BwrapProvider(max_memory_mb=512, max_cpus=2)
    with pytest.raises(SandboxRefused, match=r"memory_mb: 65536 is over this server's cap of 512"):
        provider.start(make_spec(sandbox={"memory_mb": 65536}), "t")
    with pytest.raises(SandboxRefused, match=r"ACTFLEET_SANDBOX_MAX_CPUS"):
        provider.start(make_spec(sandbox={"cpus": 8}), "t")


def test_allocating_past_the_memory_asked_for_fails_inside_the_sandbox(
    provider: BwrapProvider,
) -> None:
    with provider.start(make_spec(sandbox={"memory_mb": 128}), "t") as sb:
        r = sb.execute("b = bytearray(512 << 20)", 30, 1000)
        assert (r.error is not None and "MemoryError" in r.error) or r.state_lost
        assert sb.execute("1 + 1", 10, 1000).value == "2"


# -- the folders of dead workers -----------------------------------------------------------

HOLDER = """
import sys, time
from agent.models import TaskSpec
from workers.sandbox.bwrap import BwrapProvider
sandbox = BwrapProvider(zygote=sys.argv[1] == "zygote").start(TaskSpec(prompt="x"), "held")
print("ROOT", sandbox.root, flush=True)
time.sleep(600)
"""


def start_holder(launch_path: str) -> tuple[subprocess.Popen[str], Path]:
    """Another worker-like process holding one sandbox; returns it and the sandbox's folder."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, launch_path],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("ROOT "):
            return proc, Path(line.split()[1])
    raise AssertionError("the holder did not start a sandbox")


def test_a_starting_worker_clears_dead_workers_folders_and_keeps_live_ones(
    provider: BwrapProvider, launch_path: str
) -> None:
    # Given a worker killed with its sandbox open, a live one holding one, and our own
    dead, dead_root = start_holder(launch_path)
    live, live_root = start_holder(launch_path)
    own = provider.start(make_spec(), "own")
    try:
        dead.send_signal(signal.SIGKILL)
        dead.wait()
        dead_tag = dead_root.name.split("-")[2]
        leftovers = sorted(dead_root.parent.glob(f"actfleet-bwrap-{dead_tag}*"))
        assert dead_root in leftovers and len(leftovers) >= 3  # its sandbox, shared files, lock
        if os.geteuid() == 0 and launch_path == "classic":
            assert os.path.ismount(dead_root / "work")  # its /work tmpfs is still mounted
        cgroups = provider.cgroups()
        if cgroups is not None:  # its sandboxes (and its zygote) die with it: their
            # cgroups empty, for Cgroups.remove_stale to take once they are old enough
            theirs = [p for b in cgroups.bases.values() for p in b.glob(f"*{dead_tag}*")]
            assert theirs
            deadline = time.monotonic() + 5
            while any((p / "cgroup.procs").read_text() for p in theirs):
                assert time.monotonic() < deadline, "a dead worker's sandbox lives on"
                time.sleep(0.05)
            for path in theirs:
                path.rmdir()
        # When a worker starts and does its housekeeping
        removed = provider.start_housekeeping(lambda worker_id: True)
        # Then the dead worker's folders and lock are gone, unmounted first...
        assert removed >= 2  # its sandbox and its shared files (the lock is no folder)
        assert not any(p.exists() for p in leftovers)
        # ...and the live worker's and our own are intact, and still work
        assert live_root.is_dir() and own.root is not None and own.root.is_dir()
        assert own.execute("open('x', 'w').write('ok')", 5, 1000).ok
    finally:
        own.close()
        live.send_signal(signal.SIGTERM)
        live.wait()
        bwrap_dirs.clear_stale()


def test_a_lone_surrogate_in_the_codes_output_does_not_kill_the_session(
    sandbox: BwrapSandbox,
) -> None:
    # Given a session with state, and code whose traceback holds text UTF-8 cannot encode
    assert sandbox.execute("x = 41", 5, 1000).ok
    r = sandbox.execute("raise ValueError('bad \\udfff text')", 5, 1000)
    # Then the traceback comes back, the bad character replaced, and the session lives on
    assert not r.state_lost, r.note
    assert r.error is not None and "ValueError: bad \ufffd" in r.error
    assert sandbox.execute("x + 1", 5, 1000).value == "42"


@pytest.mark.skipif(
    BwrapProvider().cgroups() is None, reason="needs writable cgroup v1 memory and pids"
)
def test_a_starting_worker_keeps_the_cgroups_a_sibling_just_made() -> None:
    # Given a worker that has made a sandbox's cgroups, which the sandbox has not joined yet
    first = Cgroups.detect()
    assert first is not None
    name = f"actfleet-test-{os.getpid()}"
    first.create(name, 64 << 20, 64)
    try:
        # When a sibling worker in the same cgroup starts (and clears what dead workers left)
        assert Cgroups.detect() is not None
        # Then the fresh, still empty cgroups are there to join
        assert all((base / name).is_dir() for base in first.bases.values())
        # And once they are old enough to be no one's, they go
        first.remove_stale(older_than_s=0.0)
        assert not any((base / name).exists() for base in first.bases.values())
    finally:
        first.remove(name)


def test_runners_start_a_few_at_a_time_whatever_the_wave(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a wave of tasks that all want a cold sandbox at once, more than the launch slots
    from workers.sandbox import bwrap

    inside, most = 0, 0
    lock = threading.Lock()
    launch_now = bwrap.BwrapSandbox._launch_now

    def counted(self: BwrapSandbox) -> object:
        nonlocal inside, most
        with lock:
            inside += 1
            most = max(most, inside)
        try:
            return launch_now(self)
        finally:
            with lock:
                inside -= 1

    monkeypatch.setattr(bwrap.BwrapSandbox, "_launch_now", counted)
    provider = BwrapProvider()
    wave = bwrap.LAUNCH_SLOTS * 3
    outputs: list[str] = []

    def task(i: int) -> None:
        # (each in its own thread, start to close: a runner dies with the thread that made it)
        with provider.start(make_spec(), f"t{i}") as sb:
            out = sb.execute("print(1)", 10, 100).stdout.strip()
        with lock:
            outputs.append(out)

    threads = [threading.Thread(target=task, args=(i,)) for i in range(wave)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    # Then every one of them started and ran, never more than the slots starting at once
    assert outputs == ["1"] * wave
    assert 1 <= most <= bwrap.LAUNCH_SLOTS
