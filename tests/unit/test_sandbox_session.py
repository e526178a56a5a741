"""The session layer both backends share (``workers.sandbox.session``), over fake boxes:
every fault and what it becomes, without a process or a container."""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from agent.errors import SandboxError, SetupError
from agent.models import TaskSpec
from agent.sandbox import ExecResult, LazySandbox, PoolStats
from workers.sandbox.protocol import RunnerDeadline, RunnerExited, RunnerLost, RunnerProtocolError
from workers.sandbox.session import (
    AFTER_LOSS,
    CLOSED_NOTE,
    CLOSED_WHILE_RUNNING_NOTE,
    EXIT_OUT_OF_MEMORY,
    RESTART_SETUP_FAILED_NOTE,
    Box,
    Exit,
    Session,
    lost_note,
)

RUNNER = Path(__file__).resolve().parents[2] / "sandbox_images" / "python" / "runner.py"

Step = Callable[[str], ExecResult]  # what the fake runner does with one cell


@dataclass
class FakeClient:
    """A runner: each cell's outcome comes from ``on_exec``; files land in ``files``."""

    on_exec: Step = lambda code: ExecResult(stdout=f"ran {code}\n")
    on_put: Callable[[str], None] = lambda path: None
    files: dict[str, bytes] = field(default_factory=dict)
    cells: list[str] = field(default_factory=list)
    closed: bool = False

    def execute(self, code: str, timeout_s: float, max_output_chars: int) -> ExecResult:
        self.cells.append(code)
        return self.on_exec(code)

    def put_file(self, path: str, content: bytes) -> None:
        self.on_put(path)
        self.files[path] = content

    def close(self) -> None:
        self.closed = True


@dataclass
class FakeBox:
    client: FakeClient
    ended: Exit = field(default_factory=Exit)
    stopped_with: float | None = None
    killed: bool = False

    def stop(self, wait_s: float) -> Exit:
        assert self.stopped_with is None, "a box is stopped once"
        self.stopped_with = wait_s
        return self.ended

    def kill(self) -> None:
        self.killed = True

    def detail(self) -> str:
        return "runner stderr"


class FakeSession(Session):
    """A session whose boxes come from ``make_box`` (a new FakeClient each by default)."""

    backend = "fake"

    def __init__(self, spec: TaskSpec, make_box: Callable[[], FakeBox] | None = None) -> None:
        super().__init__(spec, "task-1")
        self.boxes: list[FakeBox] = []
        self.make_box = make_box or (lambda: FakeBox(FakeClient()))
        self.torn_down = 0

    def _launch(self) -> Box:
        box = self.make_box()
        self.boxes.append(box)
        return box  # type: ignore[return-value]  # a FakeClient stands in for SessionClient

    def _teardown(self) -> None:
        self.torn_down += 1


def spec(**overrides: Any) -> TaskSpec:
    return TaskSpec.from_dict({"prompt": "p", "sandbox": {"memory_mb": 256}, **overrides})


FILES = [{"path": "data/a.txt", "content_b64": "NDE="}]  # "41"


def raises(error: Exception) -> Step:
    def step(code: str) -> ExecResult:
        raise error

    return step


def lose_on(marker: str, error: RunnerLost) -> Step:
    def step(code: str) -> ExecResult:
        if marker in code:
            raise error
        return ExecResult(stdout=f"ran {code}\n")

    return step


# -- start -------------------------------------------------------------------------------


def test_prepare_writes_the_files_then_runs_setup_code_in_the_first_box() -> None:
    session = FakeSession(spec(files=FILES, setup_code="TOOL = 1"))
    session.prepare()
    [box] = session.boxes
    assert box.client.files == {"data/a.txt": b"41"}
    assert box.client.cells == ["TOOL = 1"]


def test_a_refused_file_at_start_is_a_setup_error() -> None:
    def refuse(path: str) -> None:
        raise ValueError(f"put_file {path!r}: OSError: No space left on device")

    session = FakeSession(spec(files=FILES), lambda: FakeBox(FakeClient(on_put=refuse)))
    with pytest.raises(SetupError, match=r"files: put_file 'data/a\.txt': OSError: No space"):
        session.prepare()


def test_runner_death_while_files_are_written_is_a_retryable_sandbox_error() -> None:
    def die(path: str) -> None:
        raise RunnerExited("the runner exited during put_file")

    session = FakeSession(spec(files=FILES), lambda: FakeBox(FakeClient(on_put=die)))
    with pytest.raises(SandboxError, match="died while the task's files were written") as e:
        session.prepare()
    assert e.value.retryable and not isinstance(e.value, SetupError)
    assert session.boxes[0].stopped_with == 0  # the dead box is let go at once


def test_failing_setup_code_at_start_is_a_setup_error_with_its_output() -> None:
    failing = ExecResult(
        stdout="trying\n", stderr="warn\n", error="Traceback...\nZeroDivisionError"
    )
    session = FakeSession(
        spec(setup_code="1 / 0"), lambda: FakeBox(FakeClient(on_exec=lambda c: failing))
    )
    with pytest.raises(SetupError) as e:
        session.prepare()
    assert str(e.value) == "setup_code failed:\nTraceback...\nZeroDivisionError\nwarn\n\ntrying"


def test_setup_code_that_kills_the_runner_at_start_is_a_setup_error_saying_how() -> None:
    box = FakeBox(FakeClient(on_exec=raises(RunnerExited("eof"))), ended=Exit(3))
    session = FakeSession(spec(setup_code="import os; os._exit(3)"), lambda: box)
    with pytest.raises(SetupError, match=r"setup_code: .*exited unexpectedly \(status 3\)"):
        session.prepare()
    assert box.stopped_with == 2.0  # waited for its real exit status


def test_setup_code_gets_at_least_the_tasks_exec_timeout() -> None:
    seen: list[float] = []

    class Timing(FakeClient):
        def execute(self, code: str, timeout_s: float, max_output_chars: int) -> ExecResult:
            seen.append(timeout_s)
            return ExecResult()

    slow = spec(setup_code="x = 1", limits={"exec_timeout_s": 300})
    FakeSession(slow, lambda: FakeBox(Timing())).prepare()
    FakeSession(spec(setup_code="x = 1"), lambda: FakeBox(Timing())).prepare()
    assert seen == [300.0, 120.0]


# -- losses and restarts -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "ended", "why", "waits"),
    [
        (RunnerDeadline("late"), Exit(), "did not stop at the code's 5 s time limit and was killed", 0),
        (RunnerProtocolError("junk"), Exit(-9), "stopped answering properly and was killed", 0),
        (RunnerExited("eof"), Exit(EXIT_OUT_OF_MEMORY), "ran out of memory (limit 256 MB) and was stopped", 2.0),
        (RunnerExited("eof"), Exit(137, oom_killed=True), "ran out of memory (limit 256 MB) and was stopped", 2.0),
        (RunnerExited("eof"), Exit(-9), "was killed, most likely for running out of memory (limit 256 MB)", 2.0),
        (RunnerExited("eof"), Exit(137), "was killed, most likely for running out of memory (limit 256 MB)", 2.0),
        (RunnerExited("eof"), Exit(-24), "used up its CPU time limit and was stopped", 2.0),
        (RunnerExited("eof"), Exit(139), "crashed (SIGSEGV)", 2.0),
        (RunnerExited("eof"), Exit(3), "exited unexpectedly (status 3)", 2.0),
        (RunnerExited("eof"), Exit(), "exited unexpectedly", 2.0),
    ],
)  # fmt: skip
def test_a_lost_runner_is_a_result_whose_note_says_why(
    error: RunnerLost, ended: Exit, why: str, waits: float
) -> None:
    box = FakeBox(FakeClient(on_exec=lose_on("boom", error)), ended=ended)
    session = FakeSession(spec(), lambda: box)
    session.prepare()
    r = session.execute("boom", 5, 1000)
    assert r.state_lost and r.timed_out == isinstance(error, RunnerDeadline)
    assert r.note == f"The sandbox's Python process {why}. {AFTER_LOSS}"
    assert box.stopped_with == waits  # a runner we gave up on is not waited for


def test_after_a_loss_the_next_execute_runs_in_a_new_box_with_the_task_reapplied() -> None:
    session = FakeSession(spec(files=FILES, setup_code="TOOL = 1"))
    session.make_box = lambda: FakeBox(FakeClient(on_exec=lose_on("boom", RunnerExited("eof"))))
    session.prepare()
    assert session.execute("boom", 5, 1000).state_lost
    r = session.execute("print(TOOL)", 5, 1000)
    assert r.stdout == "ran print(TOOL)\n" and r.ok
    _, second = session.boxes
    assert second.client.files == {"data/a.txt": b"41"}
    assert second.client.cells == ["TOOL = 1", "print(TOOL)"]
    assert session.restarts == 1


def test_setup_code_failing_after_a_restart_is_an_observation_and_the_code_is_not_run() -> None:
    launches = iter(
        [
            FakeClient(on_exec=lose_on("boom", RunnerExited("eof"))),
            FakeClient(on_exec=lambda c: ExecResult(error="RuntimeError: broke") if c == "S" else ExecResult(value="2")),
        ]
    )  # fmt: skip
    session = FakeSession(spec(setup_code="S"), lambda: FakeBox(next(launches)))
    session.prepare()
    assert session.execute("boom", 5, 1000).state_lost
    # When the restart's setup_code fails
    r = session.execute("1 + 1", 5, 1000)
    # Then the model is told, its code was not run, and the new session goes on
    assert r.error == "setup_code failed:\nRuntimeError: broke"
    assert r.note == RESTART_SETUP_FAILED_NOTE and not r.state_lost
    assert session.boxes[1].client.cells == ["S"]
    assert session.execute("1 + 1", 5, 1000).value == "2"
    assert len(session.boxes) == 2


def test_setup_code_killing_the_runner_after_a_restart_is_an_observation_too() -> None:
    launches = iter(
        [
            FakeBox(FakeClient(on_exec=lose_on("boom", RunnerExited("eof")))),
            FakeBox(FakeClient(on_exec=lose_on("S", RunnerExited("eof"))), ended=Exit(3)),
            FakeBox(FakeClient()),
        ]
    )
    session = FakeSession(spec(setup_code="ok"), lambda: next(launches))
    session.prepare()
    session.execute("boom", 5, 1000)
    session.spec = spec(setup_code="S")
    r = session.execute("1", 5, 1000)
    assert r.state_lost and r.note == RESTART_SETUP_FAILED_NOTE
    assert r.error is not None and "exited unexpectedly (status 3)" in r.error
    assert session.execute("1", 5, 1000).stdout == "ran 1\n"  # a third box


def test_runner_death_while_files_are_written_at_a_restart_raises() -> None:
    def die(path: str) -> None:
        raise RunnerExited("eof")

    launches = iter(
        [
            FakeBox(FakeClient(on_exec=lose_on("boom", RunnerExited("eof")))),
            FakeBox(FakeClient(on_put=die)),
        ]
    )
    session = FakeSession(spec(), lambda: next(launches))
    session.prepare()  # no files yet: the first box is fine
    session.execute("boom", 5, 1000)
    session.spec = spec(files=FILES)
    with pytest.raises(SandboxError, match="died while the task's files were written"):
        session.execute("1", 5, 1000)


def test_no_new_box_after_a_loss_raises_the_backends_sandbox_error() -> None:
    launches: list[FakeBox] = [FakeBox(FakeClient(on_exec=lose_on("boom", RunnerExited("e"))))]

    def launch() -> FakeBox:
        if not launches:
            raise SandboxError("could not start a sandbox container: engine gone")
        return launches.pop()

    session = FakeSession(spec(), launch)
    session.prepare()
    session.execute("boom", 5, 1000)
    with pytest.raises(SandboxError, match="engine gone"):
        session.execute("1", 5, 1000)


# -- close -----------------------------------------------------------------------------------


def test_close_is_idempotent_stops_the_box_and_tears_down_once() -> None:
    session = FakeSession(spec())
    session.prepare()
    session.close()
    session.close()
    [box] = session.boxes
    assert box.killed and box.stopped_with == 0 and session.torn_down == 1
    assert session.execute("1", 5, 1000) == ExecResult(state_lost=True, note=CLOSED_NOTE)
    with pytest.raises(SandboxError):
        session.prepare()


def test_close_from_another_thread_during_an_execute_gives_state_lost() -> None:
    running, release = threading.Event(), threading.Event()

    def blocking(code: str) -> ExecResult:
        running.set()
        release.wait(5)  # until the box is killed: the channel would end
        raise RunnerExited("eof")

    box = FakeBox(FakeClient(on_exec=blocking))
    box.kill = release.set  # type: ignore[method-assign]
    session = FakeSession(spec(), lambda: box)
    session.prepare()

    def close_when_running() -> None:
        running.wait(5)
        session.close()

    closer = threading.Thread(target=close_when_running)
    closer.start()
    r = session.execute("while True: pass", 60, 1000)
    closer.join()
    assert r.state_lost and r.note == CLOSED_WHILE_RUNNING_NOTE
    assert box.stopped_with == 0 and session.torn_down == 1


def test_a_box_launched_while_the_session_closes_is_stopped() -> None:
    session = FakeSession(spec())

    def launch_then_close() -> FakeBox:
        box = FakeBox(FakeClient())
        session._closed = True  # close() ran while the box started
        return box

    session.make_box = launch_then_close
    with pytest.raises(SandboxError, match="closed while starting"):
        session.prepare()
    assert session.boxes[0].stopped_with == 0


# -- the port around it ----------------------------------------------------------------------


def test_lost_note_when_closing_says_so_whatever_the_fault() -> None:
    note = lost_note(RunnerExited("eof"), Exit(-9), 5, 256, closing=True)
    assert note == CLOSED_WHILE_RUNNING_NOTE


def test_pool_stats_add_up_field_by_field() -> None:
    a = PoolStats(hits=1, misses=2, idle=3, starting=1, target=4, created=5, destroyed=1)
    b = PoolStats(hits=10, idle=1, failures=2)
    assert a + b == PoolStats(11, 2, 4, 1, 4, 5, 1, 2)
    assert sum([a, b], PoolStats()) == a + b


def test_a_lazy_sandbox_reports_the_started_sandboxes_pool_hit() -> None:
    from concurrent.futures import Future

    future: Future[Any] = Future()
    lazy = LazySandbox(future)
    assert lazy.pool_hit is False  # still starting
    session = FakeSession(spec())
    session.pool_hit = True
    future.set_result(session)
    assert lazy.pool_hit is True


def test_the_runner_and_the_worker_agree_on_the_out_of_memory_exit_status() -> None:
    # the runner may import nothing of ours, so it keeps its own copy of the constant
    loaded = importlib.util.spec_from_file_location("actfleet_sandbox_runner", RUNNER)
    assert loaded is not None and loaded.loader is not None
    runner = importlib.util.module_from_spec(loaded)
    loaded.loader.exec_module(runner)
    assert runner.EXIT_OUT_OF_MEMORY == EXIT_OUT_OF_MEMORY == 86


def test_the_fakes_meet_the_ports() -> None:
    from agent.sandbox import Sandbox, SandboxProvider
    from tests.fakes import FakeProvider, FakeSandbox

    provider: SandboxProvider = FakeProvider()
    sandbox: Sandbox = provider.start(spec(), "t")
    assert isinstance(sandbox, FakeSandbox) and not sandbox.pool_hit
    assert provider.pool_stats() == PoolStats()
