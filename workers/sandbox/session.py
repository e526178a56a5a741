"""The session layer both sandbox backends share: one task's stateful Python session over
a runner that may have to be replaced.

A backend supplies boxes: a ``Box`` is one started runner (``sandbox_images/python/
runner.py``: a process tree under bubblewrap, a container) with the ``SessionClient`` that
speaks to it. A backend's sandbox subclasses ``Session`` and says how to launch a box
(``_launch``) and what to release after the last one (``_teardown``); ``Session`` does
the rest, the same way for every backend, so that the same fault gives the same outcome:

=========================================  ==========================================
what happened                              outcome
=========================================  ==========================================
a file is refused (bad path, disk full)    at start: ``SetupError`` (the task fails)
the runner dies while files are written    ``SandboxError`` (ours: the task is retried)
setup_code raises, times out or kills      at start: ``SetupError``
the runner
the code is lost (will not stop, out of    ``ExecResult(state_lost=True, note=...)``;
memory, crash, protocol error)             the next ``execute`` starts a new runner and
                                           re-applies the files and setup_code
a file or setup_code fails in the new      ``ExecResult(error=..., note=...)``: the code
runner after such a loss                   was not run; the session goes on without
                                           what setup_code did not finish
no new runner can be started               ``SandboxError``
``close`` (any thread, idempotent)         an ``execute`` in flight returns
                                           ``state_lost``; later ones too
=========================================  ==========================================

The wording the model reads for each of these is here too (``lost_note``).
"""

from __future__ import annotations

import signal
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Protocol, Self

import structlog

from agent.errors import SandboxError, SetupError
from agent.models import TaskSpec
from agent.sandbox import ExecResult
from workers.sandbox.protocol import RunnerDeadline, RunnerLost, RunnerProtocolError, SessionClient

log = structlog.get_logger(__name__)

# The runner's exit status when it ran out of memory and could not even say so. The runner
# (sandbox_images/python/runner.py) keeps its own copy: it may import nothing of ours.
EXIT_OUT_OF_MEMORY = 86
DEFAULT_SETUP_TIMEOUT_S = 120.0  # at least; a task's exec_timeout_s may give setup_code more
CLOSE_WAIT_S = 10.0  # how long close() waits for an execute in flight to return
EXIT_WAIT_S = 2.0  # how long a dying runner may take to exit, so its real status is read

AFTER_LOSS = (
    "Variables and imports from earlier steps are gone; the next execution runs in a fresh "
    "session with the task's files and setup code re-applied."
)
CLOSED_NOTE = "The sandbox was closed."
CLOSED_WHILE_RUNNING_NOTE = "The sandbox was closed while the code ran."
RESTART_SETUP_FAILED_NOTE = (
    "The sandbox was restarted after the earlier loss, but the task's setup failed in the new "
    "session (above), so this code was not run. The session goes on without whatever the "
    "setup did not finish."
)


@dataclass(frozen=True, slots=True)
class Exit:
    """How a runner ended. ``status``: its exit status as the backend saw it (a signal as
    ``-N`` or ``128 + N``), None if unknown; ``oom_killed``: the kernel's out-of-memory
    killer took it (the backend read so from its cgroup or engine)."""

    status: int | None = None
    oom_killed: bool = False


class Box(Protocol):
    """One started runner with its ``client``, ready (its hello frame received).

    ``stop(wait_s)`` waits up to ``wait_s`` for the runner to exit by itself (so its real
    exit status is seen), then kills it, releases what the box holds and says how it
    ended (with ``wait_s=0`` the caller only wants it gone, and ``Exit()`` will do); it is
    called once, by the thread that drives the session, and never raises.
    ``kill()`` kills the runner at once from any thread (an ``execute`` in flight then sees
    its channel end); it is idempotent and never raises. ``detail()`` is a short tail of
    the runner's own stderr, for logs.
    """

    client: SessionClient

    def stop(self, wait_s: float) -> Exit: ...

    def kill(self) -> None: ...

    def detail(self) -> str: ...


def lost_note(
    error: RunnerLost, ended: Exit, timeout_s: float, memory_mb: int, *, closing: bool = False
) -> str:
    """What the model is told when its session was lost, the same for every backend."""
    if closing:
        return CLOSED_WHILE_RUNNING_NOTE
    status = ended.status
    if isinstance(error, RunnerDeadline):
        why = f"did not stop at the code's {timeout_s:g} s time limit and was killed"
    elif isinstance(error, RunnerProtocolError):
        why = "stopped answering properly and was killed"
    elif ended.oom_killed or status == EXIT_OUT_OF_MEMORY:
        why = f"ran out of memory (limit {memory_mb} MB) and was stopped"
    elif status in (-signal.SIGKILL, 128 + signal.SIGKILL):
        why = f"was killed, most likely for running out of memory (limit {memory_mb} MB)"
    elif status in (-signal.SIGXCPU, 128 + signal.SIGXCPU):
        why = "used up its CPU time limit and was stopped"
    elif status is not None and (status < 0 or status > 128):
        why = f"crashed ({_signal_name(-status if status < 0 else status - 128)})"
    elif status is not None:
        why = f"exited unexpectedly (status {status})"
    else:
        why = "exited unexpectedly"
    return f"The sandbox's Python process {why}. {AFTER_LOSS}"


class Session(ABC):
    """One task's session (``agent.sandbox.Sandbox``) over a succession of boxes.

    ``execute`` calls are serialised; ``close`` may come from any thread at any time. The
    first box is given (a pooled one) or launched by ``prepare``, which then writes the
    task's files and runs its setup_code; after a loss, the next ``execute`` launches
    another and does the same (see the module's table for every outcome).
    ``setup_timeout_s`` is setup_code's time limit (at least the task's exec_timeout_s).
    """

    backend = ""

    def __init__(
        self,
        spec: TaskSpec,
        task_id: str,
        box: Box | None = None,
        *,
        setup_timeout_s: float = DEFAULT_SETUP_TIMEOUT_S,
    ) -> None:
        self.spec = spec
        self.task_id = task_id
        self.setup_timeout_s = setup_timeout_s
        self.pool_hit = False
        self.restarts = 0
        self._box = box
        self._exec_lock = threading.Lock()
        self._state_lock = threading.Lock()  # guards _box and _closed against close()
        self._closed = False
        self._released = False

    # -- what a backend supplies ----------------------------------------------------------

    @abstractmethod
    def _launch(self) -> Box:
        """A new, ready box for ``self.spec`` (the first, or one after a loss); raises
        ``SandboxError`` if none could be started."""

    def _teardown(self) -> None:  # noqa: B027 (a hook: most backends hold nothing more)
        """Release what the session holds besides its boxes (after the last one stopped)."""

    # -- the Sandbox port -----------------------------------------------------------------

    def prepare(self) -> None:
        """Launch the first box unless one was given, write the task's files, run its
        setup_code. Raises ``SetupError`` (the task's fault) or ``SandboxError``."""
        with self._exec_lock:
            if self._closed:
                raise SandboxError("the sandbox is closed")
            box = self._box if self._box is not None else self._use(self._launch())
            if box is None:
                raise SandboxError("the sandbox was closed while starting")
            self._apply(box)

    def execute(self, code: str, timeout_s: float, max_output_chars: int) -> ExecResult:
        with self._exec_lock:
            try:
                if self._closed:
                    return ExecResult(state_lost=True, note=CLOSED_NOTE)
                box = self._box
                if box is None:
                    box, failed = self._restart()
                    if failed is not None:
                        return failed
                    assert box is not None
                started = time.perf_counter()
                try:
                    return box.client.execute(code, timeout_s, max_output_chars)
                except RunnerLost as e:
                    return self._lost(box, e, timeout_s, time.perf_counter() - started)
            finally:
                if self._closed:
                    self._release()

    def close(self) -> None:
        """Kill the runner and release everything. Idempotent, thread-safe."""
        with self._state_lock:
            if self._closed:
                return
            self._closed = True
            box = self._box
        if box is not None:
            box.kill()  # unblocks an execute in flight: its recv sees the channel end
        if self._exec_lock.acquire(timeout=CLOSE_WAIT_S):
            try:
                self._release()
            finally:
                self._exec_lock.release()
        # else: the execute in flight releases everything when it returns

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals (called with _exec_lock held) ------------------------------------------

    def _use(self, box: Box) -> Box | None:
        """Make ``box`` the current one; None (and the box stopped) if closed meanwhile."""
        with self._state_lock:
            if not self._closed:
                self._box = box
                return box
        box.stop(0)
        return None

    def _drop(self, box: Box, wait_s: float) -> Exit:
        with self._state_lock:
            if self._box is box:
                self._box = None
        return box.stop(wait_s)

    def _apply(self, box: Box) -> None:
        """Write the task's files and run its setup_code in ``box``."""
        try:
            for f in self.spec.files:
                box.client.put_file(f.path, f.content())
        except ValueError as e:
            raise SetupError(f"files: {e}") from e
        except RunnerLost as e:
            self._drop(box, 0)
            raise SandboxError(
                f"the sandbox's runner died while the task's files were written: {e}"
            ) from e
        code = self.spec.setup_code
        if not code:
            return
        limits = self.spec.limits
        timeout_s = max(self.setup_timeout_s, limits.exec_timeout_s)
        try:
            result = box.client.execute(code, timeout_s, limits.max_output_chars)
        except RunnerLost as e:
            note = self._lost(box, e, timeout_s, 0.0).note
            raise SetupError(f"setup_code: {note}") from e
        if not result.ok:
            parts = [result.error or "", result.stderr, result.stdout]
            raise SetupError("setup_code failed:\n" + "\n".join(p for p in parts if p).strip())

    def _restart(self) -> tuple[Box | None, ExecResult | None]:
        """A new box with the task re-applied, or the result to return instead."""
        box = self._use(self._launch())
        if box is None:
            return None, ExecResult(state_lost=True, note=CLOSED_NOTE)
        self.restarts += 1
        log.info("sandbox.restarted", backend=self.backend, task_id=self.task_id)
        try:
            self._apply(box)
        except SetupError as e:
            return None, ExecResult(
                error=str(e), state_lost=self._box is None, note=RESTART_SETUP_FAILED_NOTE
            )
        return box, None

    def _lost(self, box: Box, error: RunnerLost, timeout_s: float, duration_s: float) -> ExecResult:
        """Stop a box whose runner cannot go on; the result that says why, for the model."""
        closing = self._closed
        waits = not (closing or isinstance(error, RunnerDeadline | RunnerProtocolError))
        ended = self._drop(box, EXIT_WAIT_S if waits else 0)
        note = lost_note(error, ended, timeout_s, self.spec.sandbox.memory_mb, closing=closing)
        if not closing:
            log.info(
                "sandbox.lost",
                backend=self.backend,
                task_id=self.task_id,
                reason=type(error).__name__,
                status=ended.status,
                oom=ended.oom_killed,
                stderr=box.detail()[-500:],
            )
        return ExecResult(
            timed_out=isinstance(error, RunnerDeadline),
            state_lost=True,
            note=note,
            duration_s=round(duration_s, 6),
        )

    def _release(self) -> None:
        if self._released:
            return
        self._released = True
        with self._state_lock:
            box, self._box = self._box, None
        if box is not None:
            box.stop(0)
        self._teardown()


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
