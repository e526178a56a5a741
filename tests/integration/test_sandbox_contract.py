"""The sandbox contract: every behaviour the worker and the model rely on, run against both
backends (bubblewrap and Docker) with the same expectations.

What is particular to one backend (how it isolates, its caps, its leftovers) is tested in
``test_bwrap.py`` and ``test_docker_sandbox.py``. The Docker cases need a running engine and
the sandbox image and fail without them; ACTFLEET_SKIP_DOCKER=1 skips them.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.errors import SandboxError, SandboxRefused, SetupError
from agent.models import TaskSpec
from agent.sandbox import SandboxProvider
from workers.sandbox import protocol
from workers.sandbox.session import AFTER_LOSS, CLOSED_NOTE, RESTART_SETUP_FAILED_NOTE, Session

IMAGE = os.environ.get("ACTFLEET_SANDBOX_IMAGE", "actfleet-sandbox:latest")
REPO = Path(__file__).resolve().parents[2]

MakeProvider = Callable[..., SandboxProvider]


def make_spec(**overrides: object) -> TaskSpec:
    return TaskSpec.from_dict({"prompt": "test", "sandbox": {"memory_mb": 256}, **overrides})


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def lost(why: str) -> str:
    return f"The sandbox's Python process {why}. {AFTER_LOSS}"


# -- one provider factory per backend ------------------------------------------------------


@contextlib.contextmanager
def bwrap_providers(zygote: bool) -> Iterator[MakeProvider]:
    """bwrap providers whose sandboxes are forks of a zygote, or started the classic way."""
    if shutil.which("bwrap") is None:
        pytest.skip("bubblewrap is not installed")
    from workers.sandbox.bwrap import BwrapProvider

    made: list[SandboxProvider] = []

    def make(pool: int = 0, work_mb: int = 256, allow_network: bool = False) -> SandboxProvider:
        provider = BwrapProvider(
            pool_min_size=pool,
            pool_max_size=pool,
            work_mb=work_mb,
            allow_network=allow_network,
            zygote=zygote,
        )
        made.append(provider)
        return provider

    try:
        yield make
    finally:
        for provider in made:
            provider.close()


@contextlib.contextmanager
def docker_providers() -> Iterator[MakeProvider]:
    if os.environ.get("ACTFLEET_SKIP_DOCKER") == "1":
        pytest.skip("ACTFLEET_SKIP_DOCKER=1")
    import docker
    import docker.errors

    from workers.sandbox.docker import LABEL_WORKER, DockerProvider, Hardening

    try:
        api = docker.APIClient(**docker.utils.kwargs_from_env())
        api.ping()
        api.inspect_image(IMAGE)
    except Exception as e:
        pytest.fail(f"no Docker engine or no image {IMAGE} ({e}): run .ci/docker.sh")
    worker_id = f"test-{uuid.uuid4().hex[:10]}"
    fleet = f"testfleet-{uuid.uuid4().hex[:10]}"
    made: list[SandboxProvider] = []

    def make(pool: int = 0, work_mb: int = 256, allow_network: bool = False) -> SandboxProvider:
        provider = DockerProvider(
            worker_id=worker_id,
            fleet=fleet,
            client=api,
            image=IMAGE,
            pool_min_size=pool,
            pool_max_size=pool,
            hardening=Hardening(workdir_mb=work_mb),
            allow_network=allow_network,
        )
        made.append(provider)
        return provider

    try:
        yield make
    finally:
        for provider in made:
            provider.close()
        leftovers = api.containers(all=True, filters={"label": f"{LABEL_WORKER}={worker_id}"})
        for c in leftovers:
            with contextlib.suppress(docker.errors.APIError):
                api.remove_container(c["Id"], force=True)
        assert not leftovers, f"containers left behind: {[c['Names'] for c in leftovers]}"


@pytest.fixture(params=["bwrap", "bwrap-classic", "docker"])
def backend(request: pytest.FixtureRequest) -> str:
    request.applymarker(getattr(pytest.mark, str(request.param).split("-")[0]))
    return str(request.param)


@pytest.fixture
def providers(backend: str) -> Iterator[MakeProvider]:
    if backend == "docker":
        found = docker_providers()
    else:
        found = bwrap_providers(zygote=backend == "bwrap")
    with found as make:
        yield make


@pytest.fixture
def provider(providers: MakeProvider) -> SandboxProvider:
    return providers()


@pytest.fixture
def sandbox(provider: SandboxProvider, backend: str) -> Iterator[Any]:
    sb = provider.start(make_spec(), "task-contract")
    if backend.startswith("bwrap"):  # the path under test, not a fallback
        assert sb.forked == (backend == "bwrap")
    yield sb
    sb.close()


def wait_for_idle(provider: SandboxProvider, idle: int) -> None:
    deadline = time.monotonic() + 60
    while provider.pool_stats().idle < idle and time.monotonic() < deadline:
        time.sleep(0.05)
    assert provider.pool_stats().idle == idle


@contextlib.contextmanager
def runner_dies_at_each_file(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """While active, the runner dies (really: it runs ``os._exit``) just before each file
    is written into it, as if it crashed there."""
    put_file = protocol.SessionClient.put_file

    def dying_put_file(self: protocol.SessionClient, path: str, content: bytes) -> None:
        with contextlib.suppress(protocol.RunnerLost):
            self.execute("import os\nos._exit(1)", 5, 100)
        put_file(self, path, content)

    with monkeypatch.context() as m:
        m.setattr(protocol.SessionClient, "put_file", dying_put_file)
        yield


# -- a stateful session --------------------------------------------------------------------


def test_state_survives_across_executions(sandbox: Session) -> None:
    assert sandbox.execute("import json\nrows = [1, 2, 3]", 10, 1000).ok
    assert sandbox.execute("json.dumps(rows)", 10, 1000).value == "'[1, 2, 3]'"


def test_stdout_stderr_and_the_last_value_come_back_apart(sandbox: Session) -> None:
    r = sandbox.execute("import sys\nprint('out')\nsys.stderr.write('err\\n')\n6 * 7", 10, 1000)
    assert (r.stdout, r.stderr, r.value, r.error) == ("out\n", "err\n", "42", None)
    assert r.ok and not r.timed_out and not r.state_lost


def test_an_exception_is_a_traceback_of_the_users_code_and_the_session_lives_on(
    sandbox: Session,
) -> None:
    sandbox.execute("x = 1", 10, 1000)
    r = sandbox.execute("def f():\n    return 1 / 0\nf()", 10, 1000)
    assert r.error is not None and not r.state_lost
    assert r.error.startswith("Traceback (most recent call last):")
    assert 'File "<cell 2>", line 2, in f' in r.error
    assert r.error.endswith("ZeroDivisionError: division by zero")
    assert "runner.py" not in r.error
    assert sandbox.execute("x", 10, 1000).value == "1"


def test_a_lone_surrogate_in_the_output_does_not_kill_the_session(sandbox: Session) -> None:
    assert sandbox.execute("x = 41", 10, 1000).ok
    r = sandbox.execute("raise ValueError('bad \\udfff text')", 10, 1000)
    assert not r.state_lost, r.note
    assert r.error is not None and "ValueError: bad \ufffd" in r.error
    assert sandbox.execute("x + 1", 10, 1000).value == "42"


# -- time limits ---------------------------------------------------------------------------


def test_a_busy_loop_is_interrupted_at_its_time_limit_and_state_survives(
    sandbox: Session,
) -> None:
    sandbox.execute("x = 1", 10, 1000)
    r = sandbox.execute("while True:\n    pass", 1, 1000)
    assert r.timed_out and not r.state_lost
    assert r.error is not None
    assert r.error.endswith(
        "ExecutionTimeout: the execution was interrupted after 1 s (time limit)"
    )
    assert sandbox.execute("x", 10, 1000).value == "1"


def test_code_that_will_not_stop_is_killed_and_the_next_execute_restarts_fresh(
    provider: SandboxProvider,
) -> None:
    spec = make_spec(
        setup_code="TOOL = 'ready'", files=[{"path": "data/n.txt", "content_b64": b64(b"41")}]
    )
    sb: Any = provider.start(spec, "task-stubborn")
    try:
        sb.execute("x = 1", 10, 1000)
        stubborn = (
            "import time\nwhile True:\n    try:\n        time.sleep(10)\n"
            "    except BaseException:\n        pass"
        )
        started = time.monotonic()
        r = sb.execute(stubborn, 1, 1000)
        assert time.monotonic() - started < 1 + 5  # liveness: the host deadline is 1 s + grace
        assert r.timed_out and r.state_lost
        assert r.note == lost("did not stop at the code's 1 s time limit and was killed")
        after = sb.execute("TOOL, open('data/n.txt').read(), 'x' in globals()", 10, 1000)
        assert after.value == "('ready', '41', False)"
        assert sb.restarts == 1
        assert sb.execute("1 + 1", 10, 1000).value == "2"  # and it keeps working
    finally:
        sb.close()


# -- output ----------------------------------------------------------------------------------


def test_huge_output_comes_back_capped(sandbox: Session) -> None:
    r = sandbox.execute(
        "import sys\nfor _ in range(100):\n    sys.stdout.write('z' * 1_000_000)", 60, 2000
    )
    assert r.ok
    assert "[... 99998000 characters cut ...]" in r.stdout and len(r.stdout) < 2100
    r = sandbox.execute("import os\nfor _ in range(100): os.write(2, b'y' * 1_000_000)", 60, 2000)
    assert r.ok and "characters cut" in r.stderr and len(r.stderr) < 2100
    r = sandbox.execute("'v' * 10_000_000", 60, 2000)
    assert r.value is not None and "characters cut" in r.value and len(r.value) < 2100


# -- files and setup_code ------------------------------------------------------------------


def test_files_and_setup_code_are_applied_before_the_first_execute(
    provider: SandboxProvider,
) -> None:
    spec = make_spec(
        files=[
            {"path": "data/n.txt", "content_b64": b64(b"41")},
            {"path": "raw.bin", "content_b64": b64(b"\x00\xff")},
        ],
        setup_code="def answer():\n    return int(open('data/n.txt').read()) + 1",
    )
    sb = provider.start(spec, "task-files")
    try:
        r = sb.execute("answer(), open('raw.bin', 'rb').read()", 10, 1000)
        assert r.value == "(42, b'\\x00\\xff')"
    finally:
        sb.close()


def test_failing_setup_code_fails_the_start_with_its_traceback(provider: SandboxProvider) -> None:
    with pytest.raises(SetupError) as raised:
        provider.start(make_spec(setup_code="print('trying')\n1 / 0"), "task-setup")
    text = str(raised.value)
    assert text.startswith("setup_code failed:\nTraceback")
    assert "ZeroDivisionError: division by zero" in text and "trying" in text


def test_setup_code_that_kills_its_runner_fails_the_start(provider: SandboxProvider) -> None:
    with pytest.raises(SetupError, match="exited unexpectedly \\(status 3\\)"):
        provider.start(make_spec(setup_code="import os\nos._exit(3)"), "task-setup-dies")


def test_a_file_the_runner_refuses_fails_the_start(providers: MakeProvider) -> None:
    # Given a server whose sandboxes get 1 MB of /work, and a task with a 2 MB file
    provider = providers(work_mb=1)
    spec = make_spec(files=[{"path": "big.bin", "content_b64": b64(b"0" * (2 << 20))}])
    # Then the start fails as the task's fault, saying why
    with pytest.raises(SetupError, match=r"files: put_file 'big.bin': .*No space left on device"):
        provider.start(spec, "task-big-file")


def test_setup_code_failing_after_a_restart_is_told_to_the_model(
    provider: SandboxProvider,
) -> None:
    # Given a session whose setup_code ran at start but fails when it is run again
    sb: Any = provider.start(make_spec(setup_code="TOOL = 1"), "task-setup-later")
    try:
        sb.spec = dataclasses.replace(sb.spec, setup_code="raise RuntimeError('setup broke')")
        assert sb.execute("import os\nos._exit(3)", 10, 1000).state_lost
        # When the next execute restarts the sandbox
        r = sb.execute("print('ran')", 10, 1000)
        # Then the model reads setup's traceback and that its code was not run
        assert r.error is not None and "RuntimeError: setup broke" in r.error
        assert r.note == RESTART_SETUP_FAILED_NOTE and r.stdout == ""
        assert not r.state_lost
        # and the session goes on, without what setup did not do
        assert sb.execute("'TOOL' in globals(), 1 + 1", 10, 1000).value == "(False, 2)"
        assert sb.restarts == 1
    finally:
        sb.close()


# -- the runner dies -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "why"),
    [
        ("import os\nos._exit(3)", "exited unexpectedly (status 3)"),
        (
            "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)",
            "was killed, most likely for running out of memory (limit 256 MB)",
        ),
        ("import ctypes\nctypes.string_at(0)", "crashed (SIGSEGV)"),
    ],
    ids=["exit", "sigkill", "segfault"],
)
def test_a_runner_that_dies_loses_the_state_with_a_note_and_the_next_execute_restarts(
    sandbox: Session, code: str, why: str
) -> None:
    sandbox.execute("x = 1", 10, 1000)
    r = sandbox.execute(code, 10, 1000)
    assert r.state_lost and not r.timed_out
    assert r.note == lost(why)
    after = sandbox.execute("'x' in globals()", 10, 1000)
    assert after.value == "False" and not after.state_lost


def test_runner_death_while_files_are_written_at_start_is_our_fault(
    provider: SandboxProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = make_spec(files=[{"path": "n.txt", "content_b64": b64(b"1")}])
    with runner_dies_at_each_file(monkeypatch), pytest.raises(SandboxError) as raised:
        provider.start(spec, "task-files-die")
    assert raised.value.retryable
    assert "died while the task's files were written" in str(raised.value)


def test_runner_death_while_files_are_written_at_a_restart_is_our_fault(
    provider: SandboxProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = make_spec(files=[{"path": "n.txt", "content_b64": b64(b"1")}])
    sb = provider.start(spec, "task-files-die-later")
    try:
        assert sb.execute("import os\nos._exit(3)", 10, 1000).state_lost
        with runner_dies_at_each_file(monkeypatch), pytest.raises(SandboxError) as raised:
            sb.execute("1", 10, 1000)
        assert raised.value.retryable
    finally:
        sb.close()


# -- memory --------------------------------------------------------------------------------


def test_the_runners_out_of_memory_exit_is_told_as_such(sandbox: Session) -> None:
    from workers.sandbox.session import EXIT_OUT_OF_MEMORY

    r = sandbox.execute(f"import os\nos._exit({EXIT_OUT_OF_MEMORY})", 10, 1000)
    assert r.state_lost
    assert r.note == lost("ran out of memory (limit 256 MB) and was stopped")
    assert sandbox.execute("1 + 1", 10, 1000).value == "2"


def test_a_memory_hog_is_told_it_ran_out_of_memory_and_the_sandbox_goes_on(
    sandbox: Session,
) -> None:
    r = sandbox.execute("hog = []\nwhile True:\n    hog.append(bytearray(10**7))", 60, 1000)
    told = (r.error or "") + (r.note or "")
    # bwrap's address-space limit makes it a MemoryError in the cell; Docker's cgroup
    # kills the container: either way the model reads that memory ran out, and the limit
    assert "out of memory (limit 256 MB)" in told, r
    assert not r.ok
    assert sandbox.execute("hog = None\nsum(range(10))", 10, 1000).value == "45"


# -- the sandbox's boundary ----------------------------------------------------------------


def test_the_sandbox_has_no_network_but_its_own_loopback(sandbox: Session) -> None:
    # Given a listener on the host's loopback (the only address a test may dial)
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    try:
        # Then the sandbox sees no interface but its own loopback, and cannot reach the host's
        names = sandbox.execute(
            "import socket; sorted(n for _, n in socket.if_nameindex())", 10, 1000
        )
        assert names.value == "['lo']"
        dial = sandbox.execute(
            f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)", 10, 1000
        )
        assert dial.error is not None and "Connection refused" in dial.error
    finally:
        server.close()


def test_a_task_asking_for_network_is_refused_unless_the_server_allows_it(
    provider: SandboxProvider,
) -> None:
    with pytest.raises(SandboxRefused, match="this server does not give tasks network access"):
        provider.start(make_spec(sandbox={"network": True}), "task-net")


@pytest.mark.parametrize("path", ["/usr/evil", "/etc/evil", "/evil", "/opt/evil"])
def test_writing_outside_the_work_dir_fails_and_work_and_tmp_are_writable(
    sandbox: Session, path: str
) -> None:
    r = sandbox.execute(f"open({path!r}, 'w').write('x')", 10, 1000)
    assert r.error is not None
    assert any(
        why in r.error for why in ("Read-only file system", "Permission denied", "No such file")
    )
    assert not Path(path).exists()
    r = sandbox.execute(
        "open('out.txt', 'w').write('ok'); open('/tmp/t', 'w').write('ok')", 10, 1000
    )
    assert r.ok, r.error


# -- close -----------------------------------------------------------------------------------


def test_close_is_idempotent_and_later_executes_say_it_is_closed(sandbox: Session) -> None:
    assert sandbox.execute("1", 10, 1000).ok
    sandbox.close()
    sandbox.close()
    r = sandbox.execute("1", 10, 1000)
    assert r.state_lost and r.note == CLOSED_NOTE


def test_close_from_another_thread_ends_an_execute_in_flight(sandbox: Session) -> None:
    closer = threading.Timer(0.5, sandbox.close)
    closer.start()
    started = time.monotonic()
    r = sandbox.execute("while True:\n    pass", 60, 1000)
    assert time.monotonic() - started < 10  # liveness: it returns once the runner is killed
    closer.join()
    assert r.state_lost and r.note == "The sandbox was closed while the code ran."
    assert sandbox.execute("1", 10, 1000).state_lost


# -- the warm pool ---------------------------------------------------------------------------


def test_a_warm_pool_serves_default_tasks_and_counts_its_hits(providers: MakeProvider) -> None:
    # Given a provider keeping one sandbox warm
    provider = providers(pool=1)
    assert provider.pool_stats().idle == 0  # nothing before start_pool
    provider.start_pool()
    wait_for_idle(provider, 1)
    # When a task with the default limits starts, it gets the warm one, its task applied
    spec = TaskSpec.from_dict(
        {
            "prompt": "test",
            "files": [{"path": "n.txt", "content_b64": b64(b"42")}],
            "setup_code": "TOOL = 'ready'",
        }
    )
    warm = provider.start(spec, "task-warm")
    # and one that asks for other limits gets a sandbox started for it
    cold = provider.start(make_spec(sandbox={"memory_mb": 128}), "task-cold")
    try:
        assert warm.pool_hit and not cold.pool_hit
        r = warm.execute("print(open('n.txt').read(), TOOL)", 10, 1000)
        assert r.stdout == "42 ready\n"
        assert cold.execute("1 + 1", 10, 1000).value == "2"
        stats = provider.pool_stats()
        assert (stats.hits, stats.misses) == (1, 0)
    finally:
        warm.close()
        cold.close()
    # Then closing the provider leaves no idle sandbox; closing it again is harmless
    provider.close()
    provider.close()
    assert provider.pool_stats().idle == 0


def test_a_provider_without_a_pool_starts_every_sandbox_cold(provider: SandboxProvider) -> None:
    provider.start_pool()  # a no-op: made without a pool
    sb = provider.start(make_spec(), "task-no-pool")
    try:
        assert not sb.pool_hit
        assert provider.pool_stats() == type(provider.pool_stats())()
    finally:
        sb.close()
