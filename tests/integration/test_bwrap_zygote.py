"""What only the zygote path of the bwrap backend has: siblings forked from one zygote stay
apart, each child has no way back to privilege, a dead zygote is replaced, and the
classic path takes over where the zygote cannot serve. Real bwrap, real cgroups, no mocks."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.models import TaskSpec
from workers.sandbox.bwrap import BwrapProvider, BwrapSandbox

pytestmark = [
    pytest.mark.bwrap,
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed"),
    pytest.mark.skipif(
        shutil.which("bwrap") is None or BwrapProvider().cgroups() is None,
        reason="the zygote needs writable cgroup v1 memory and pids",
    ),
]

MAIN = Path(__file__).resolve().parents[2]


def make_spec(**overrides: object) -> TaskSpec:
    return TaskSpec.from_dict({"prompt": "test", **overrides})


def run(sb: BwrapSandbox, code: str, timeout_s: float = 10) -> str:
    """The value of ``code``'s last expression (its error, if it raised)."""
    result = sb.execute(textwrap.dedent(code), timeout_s, 4000)
    assert result.error is None, result.error
    return result.value or result.stdout


@pytest.fixture
def provider() -> Iterator[BwrapProvider]:
    p = BwrapProvider(zygote=True)
    yield p
    p.close()


@pytest.fixture
def pair(provider: BwrapProvider) -> Iterator[tuple[BwrapSandbox, BwrapSandbox]]:
    """Two live sandboxes forked by the same zygote."""
    a = provider.start(make_spec(), "a")
    b = provider.start(make_spec(), "b")
    assert a.forked and b.forked
    yield a, b
    a.close()
    b.close()


# -- siblings ------------------------------------------------------------------------------


def test_siblings_do_not_share_work_tmp_or_shm(pair: tuple[BwrapSandbox, BwrapSandbox]) -> None:
    a, b = pair
    for path in ("/work/secret", "/tmp/secret", "/dev/shm/secret"):
        run(a, f"open({path!r}, 'w').write('of a')")
    seen = run(b, "import os\nsorted(os.listdir(p) for p in ('/work', '/tmp', '/dev/shm'))")
    assert "secret" not in seen
    assert run(a, "open('/work/secret').read()") == "'of a'"


def test_nothing_siblings_share_from_the_zygote_is_writable(
    pair: tuple[BwrapSandbox, BwrapSandbox],
) -> None:
    """The zygote's mounts (``/dev`` is a tmpfs the sandbox's uid owns) are every child's:
    had any stayed writable, one task could leave files there for the next."""
    a, b = pair
    probe = """
    import os
    found = []
    for top in ('/', '/dev', '/etc', '/usr', '/opt', '/opt/actfleet'):
        try:
            open(os.path.join(top, 'left-behind'), 'w').write('of a')
            found.append(top)
        except OSError:
            pass
    found
    """
    assert run(a, probe) == "[]"
    assert run(b, "import os\n[p for p in ('/dev', '/') if 'left-behind' in os.listdir(p)]") == "[]"


def test_a_sandbox_sees_and_signals_only_its_own_processes(
    pair: tuple[BwrapSandbox, BwrapSandbox], provider: BwrapProvider
) -> None:
    a, b = pair
    run(a, "import subprocess\np = subprocess.Popen(['sleep', '300'])")
    # b's /proc lists its own init, runner and nothing of a's (nor the zygote)
    seen = run(
        b,
        """
        import os
        names = {}
        for pid in os.listdir('/proc'):
            if pid.isdigit():
                names[int(pid)] = open(f'/proc/{pid}/cmdline', 'rb').read().split(b'\\0')[0]
        sorted(names.items())
        """,
    )
    assert "sleep" not in seen and "--zygote" not in seen
    assert seen.startswith("[(1, b'/usr/bin/python3'), (2, b'/usr/bin/python3')")
    # and a kill of everything it may signal (kill -1) reaches none of a's or the zygote
    zygote = provider.zygote()
    assert zygote is not None and zygote.pid is not None
    b.execute("import os, signal\nos.kill(-1, signal.SIGKILL)", 5, 1000)
    assert run(a, "p.poll() is None") == "True"  # a's sleep lives
    assert zygote.pid is not None
    assert provider.start(make_spec(), "c").execute("1 + 1", 5, 100).value == "2"


def test_siblings_have_their_own_loopback_and_abstract_sockets(
    pair: tuple[BwrapSandbox, BwrapSandbox],
) -> None:
    a, b = pair
    port = run(
        a,
        """
        import socket
        tcp = socket.socket()
        tcp.bind(('127.0.0.1', 0))
        tcp.listen()
        unix = socket.socket(socket.AF_UNIX)
        unix.bind('\\0actfleet-zygote-test')
        unix.listen()
        tcp.getsockname()[1]
        """,
    )
    dial = f"""
        import socket
        out = []
        for family, address in ((socket.AF_INET, ('127.0.0.1', {port})),
                                (socket.AF_UNIX, '\\0actfleet-zygote-test')):
            s = socket.socket(family)
            s.settimeout(2)
            try:
                s.connect(address)
                out.append('connected')
            except OSError as e:
                out.append(type(e).__name__)
            s.close()
        out
        """
    assert run(a, dial) == "['connected', 'connected']"  # it is there, for a
    assert run(b, dial) == "['ConnectionRefusedError', 'ConnectionRefusedError']"


def test_siblings_do_not_share_sysv_ipc(pair: tuple[BwrapSandbox, BwrapSandbox]) -> None:
    a, b = pair
    key = 0x5A1D
    made = run(a, f"import ctypes\nctypes.CDLL(None).shmget({key}, 4096, 0o1600)")
    assert int(made) >= 0
    segments = "open('/proc/sysvipc/shm').read().split()"
    assert str(key) in run(a, segments)
    assert str(key) not in run(b, segments)


def test_the_network_is_its_own_loopback_only(provider: BwrapProvider) -> None:
    # Given a listener on the host's loopback
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    try:
        with provider.start(make_spec(), "t") as sb:
            assert sb.forked
            code = f"""
                import os, socket
                s = socket.socket()
                s.settimeout(2)
                try:
                    s.connect(('127.0.0.1', {port}))
                    dialed = 'connected'
                except OSError as e:
                    dialed = type(e).__name__
                (sorted(os.listdir('/sys/class/net')) if os.path.isdir('/sys/class/net')
                 else open('/proc/net/dev').read().split('\\n')[2:-1], dialed)
                """
            interfaces, dialed = eval(run(sb, code))
            assert dialed == "ConnectionRefusedError"
            assert len(interfaces) == 1 and "lo" in str(interfaces)
    finally:
        server.close()


# -- no way back to privilege --------------------------------------------------------------


def test_the_runner_has_no_capabilities_and_cannot_make_a_user_namespace(
    provider: BwrapProvider,
) -> None:
    with provider.start(make_spec(), "t") as sb:
        caps = run(
            sb,
            """
            fields = dict(l.split(':', 1) for l in open('/proc/self/status').read().splitlines())
            {k: fields[k].strip() for k in
             ('CapInh', 'CapPrm', 'CapEff', 'CapBnd', 'CapAmb', 'NoNewPrivs', 'Uid')}
            """,
        )
        assert eval(caps) == {
            "CapInh": "0000000000000000",
            "CapPrm": "0000000000000000",
            "CapEff": "0000000000000000",
            "CapBnd": "0000000000000000",
            "CapAmb": "0000000000000000",
            "NoNewPrivs": "1",
            "Uid": "65534\t65534\t65534\t65534",
        }
        tried = run(
            sb,
            """
            import ctypes, os, subprocess
            libc = ctypes.CDLL(None, use_errno=True)
            direct = libc.unshare(0x10000000), os.strerror(ctypes.get_errno())
            tool = subprocess.run(['unshare', '-U', 'true'], capture_output=True, text=True)
            sysctl = open('/proc/sys/user/max_user_namespaces').read().strip()
            try:
                open('/proc/sys/user/max_user_namespaces', 'w').write('10')
                raised = 'raised'
            except OSError as e:
                raised = type(e).__name__
            (direct, tool.returncode, sysctl, raised)
            """,
        )
        direct, tool_rc, sysctl, raised = eval(tried)
        assert direct[0] == -1 and tool_rc != 0
        assert sysctl == "0" and raised == "PermissionError"


def test_the_runner_cannot_trace_its_pid_1(provider: BwrapProvider) -> None:
    # (pid 1 keeps its capabilities in the sandbox's user namespace, to reap; it runs
    # nothing of the task's and the runner, without them, may not attach to it)
    with provider.start(make_spec(), "t") as sb:
        tried = run(
            sb,
            """
            import ctypes, os
            libc = ctypes.CDLL(None, use_errno=True)
            r = libc.ptrace(16, 1, None, None)  # PTRACE_ATTACH
            try:
                open('/proc/1/mem', 'rb').read(1)
                mem = 'read'
            except OSError as e:
                mem = type(e).__name__
            (r, os.strerror(ctypes.get_errno()), mem)
            """,
        )
        assert eval(tried) == (-1, "Operation not permitted", "PermissionError")


def test_the_limits_are_the_classic_ones(provider: BwrapProvider) -> None:
    with provider.start(make_spec(sandbox={"memory_mb": 256}), "t") as sb:
        limits = run(
            sb,
            """
            import resource as r
            [r.getrlimit(getattr(r, n))[0] for n in
             ('RLIMIT_AS', 'RLIMIT_NPROC', 'RLIMIT_FSIZE', 'RLIMIT_NOFILE', 'RLIMIT_CORE')]
            """,
        )
        assert eval(limits) == [256 << 20, 128, 64 << 20, 256, 0]
        # and of what the kernel counts per host uid (shared by the zygote's sandboxes),
        # each gets a share
        inotify = "open('/proc/sys/user/max_inotify_instances').read().strip()"
        assert run(sb, inotify) == "'16'"
        assert run(sb, "import socket\nsocket.gethostname()") == "'sandbox'"


def test_a_fork_bomb_in_one_sandbox_leaves_its_sibling_room_to_fork(
    pair: tuple[BwrapSandbox, BwrapSandbox],
) -> None:
    a, b = pair
    bomb = a.execute(
        "import os, time\n"
        "n = 0\n"
        "try:\n"
        "    while True:\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(60)\n"
        "            os._exit(0)\n"
        "        n += 1\n"
        "except OSError as e:\n"
        "    print('refused after', n)",
        10,
        1000,
    )
    assert "refused after" in bomb.stdout
    forks = run(
        b,
        """
        import os, time
        kids = []
        for _ in range(20):
            kid = os.fork()
            if kid == 0:
                time.sleep(0.5)
                os._exit(0)
            kids.append(kid)
        len([os.waitpid(k, 0) for k in kids])
        """,
    )
    assert forks == "20"


# -- the sandbox's lifetime ----------------------------------------------------------------


def test_closing_a_sandbox_kills_what_it_left_running_in_the_background(
    provider: BwrapProvider,
) -> None:
    # Given a sandbox whose code started a daemon (double fork, own session)
    sb = provider.start(make_spec(), "t")
    run(
        sb,
        """
        import os, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                time.sleep(300)
            os._exit(0)
        time.sleep(0.2)
        """,
    )
    assert sb.cgroups is not None and sb.root is not None
    members = sb.cgroups.members(sb.root.name)
    assert len(members) >= 4  # the child, its init, the runner, the daemon
    # When the sandbox is closed, then every one of its processes is gone
    sb.close()
    assert not [pid for pid in members if Path(f"/proc/{pid}").exists()]


def test_a_dead_zygote_is_replaced_and_the_session_restarts(provider: BwrapProvider) -> None:
    # Given a running session forked from the zygote
    sb = provider.start(make_spec(files=[], setup_code="TOOL = 'ready'"), "t")
    try:
        run(sb, "x = 1")
        zygote = provider.zygote()
        assert zygote is not None and zygote.pid is not None and zygote.starts == 1
        # When the zygote dies (with every sandbox it forked)
        os.killpg(zygote.pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while sb.alive():  # its sandboxes die with its namespace, a moment later
            assert time.monotonic() < deadline
            time.sleep(0.01)
        # Then the session says its state was lost, and the next execute runs in a new
        # sandbox from a new zygote, setup_code re-applied
        lost = sb.execute("x", 5, 1000)
        assert lost.state_lost and lost.note is not None
        assert sb.execute("TOOL", 5, 1000).value == "'ready'"
        assert sb.forked and zygote.starts == 2
        # and new tasks start there too
        with provider.start(make_spec(), "next") as other:
            assert other.forked and other.execute("1 + 1", 5, 100).value == "2"
    finally:
        sb.close()


def test_closing_the_provider_lets_running_sandboxes_finish() -> None:
    # Given a provider whose zygote has a sandbox running
    provider = BwrapProvider(zygote=True)
    sb = provider.start(make_spec(), "t")
    zygote = provider.zygote()
    assert zygote is not None and zygote.pid is not None
    outer = zygote.pid
    # When the provider closes (the worker shuts down), the sandbox still serves its task
    provider.close()
    assert sb.execute("1 + 1", 5, 100).value == "2"
    # and once it is closed, the zygote is gone too
    sb.close()
    deadline = time.monotonic() + 5
    while Path(f"/proc/{outer}").exists() and b"Z" not in _state(outer):
        assert time.monotonic() < deadline, "the zygote outlived its last sandbox"
        time.sleep(0.01)


def _state(pid: int) -> bytes:
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return b"Z"
    return stat[stat.rindex(b")") + 2 :][:1]


# -- the classic path takes over -----------------------------------------------------------


def test_a_runner_without_a_zygote_mode_falls_back_to_the_classic_path(tmp_path: Path) -> None:
    # Given a runner that predates the zygote (it does not know --zygote)
    source = (MAIN / "sandbox_images" / "python" / "runner.py").read_text()
    entry = 'if sys.argv[1:2] == ["--zygote"]:'
    assert entry in source
    runner = tmp_path / "runner.py"
    runner.write_text(source.replace(entry, "if False:"))
    provider = BwrapProvider(runner_path=runner, zygote=True)
    try:
        # When tasks start, they run, the classic way, and the zygote is not tried again
        for _ in range(2):
            with provider.start(make_spec(), "t") as sb:
                assert not sb.forked
                assert sb.execute("1 + 1", 5, 100).value == "2"
        zygote = provider.zygote()
        assert zygote is not None and zygote.broken is not None and zygote.starts == 1
    finally:
        provider.close()


def test_network_tasks_and_hosts_without_cgroups_take_the_classic_path() -> None:
    allowed = BwrapProvider(allow_network=True)
    no_cgroups = BwrapProvider(use_cgroups=False)
    turned_off = BwrapProvider(zygote=False)
    try:
        cases = [
            (allowed, make_spec(sandbox={"network": True})),
            (no_cgroups, make_spec()),
            (turned_off, make_spec()),
        ]
        for provider, spec in cases:
            with provider.start(spec, "t") as sb:
                assert not sb.forked
                assert sb.execute("1 + 1", 5, 100).value == "2"
        with allowed.start(make_spec(), "t") as sb:  # no network asked: forked
            assert sb.forked
    finally:
        for p in (allowed, no_cgroups, turned_off):
            p.close()


def test_a_pool_of_forked_sandboxes_serves_tasks() -> None:
    provider = BwrapProvider(pool_min_size=2, pool_max_size=2)
    provider.start_pool()
    try:
        deadline = time.monotonic() + 20
        while provider.pool_stats().idle < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        with provider.start(make_spec(setup_code="y = 2"), "t") as sb:
            assert sb.pool_hit and sb.forked
            assert sb.execute("y * 21", 5, 100).value == "42"
    finally:
        provider.close()
