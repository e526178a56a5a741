"""The sandbox port: where the model's code runs.

A ``Sandbox`` is one stateful Python session (a notebook kernel, in effect) inside a
disposable isolation boundary. ``SandboxProvider.start`` makes one for a task, with the
task's files written into the work dir and its ``setup_code`` already run.
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Protocol

from agent.models import TaskSpec


@dataclass(frozen=True, slots=True)
class ExecResult:
    """What one execution produced. Every text field is already capped by the runner.

    ``error`` holds a traceback that shows the user's code only. ``timed_out`` means the
    execution was interrupted at its timeout and the session's state survived.
    ``state_lost`` means the sandbox had to be killed (the code would not stop, it ran out
    of memory, the process died); ``note`` then says why in words meant for the model, and
    the next ``execute`` runs in a fresh session (files and setup_code re-applied).
    """

    stdout: str = ""
    stderr: str = ""
    value: str | None = None
    error: str | None = None
    timed_out: bool = False
    state_lost: bool = False
    note: str | None = None
    duration_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None and not self.timed_out and not self.state_lost

    def to_dict(self) -> dict[str, object]:
        return {
            "stdout": self.stdout,
            "stderr": self.stderr,
            "value": self.value,
            "error": self.error,
            "timed_out": self.timed_out,
            "state_lost": self.state_lost,
            "note": self.note,
            "duration_s": self.duration_s,
        }

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> ExecResult:
        return cls(
            stdout=str(d.get("stdout") or ""),
            stderr=str(d.get("stderr") or ""),
            value=None if d.get("value") is None else str(d["value"]),
            error=None if d.get("error") is None else str(d["error"]),
            timed_out=bool(d.get("timed_out")),
            state_lost=bool(d.get("state_lost")),
            note=None if d.get("note") is None else str(d["note"]),
            duration_s=float(d.get("duration_s") or 0.0),  # type: ignore[arg-type]
        )


class Sandbox(Protocol):
    """One stateful Python session.

    ``execute`` blocks until the code finished, was interrupted at ``timeout_s``, or the
    sandbox was killed (at most a couple of seconds after ``timeout_s``). It raises
    ``SandboxError`` only for our own faults (the runner broke the protocol and could not
    be restarted). ``close`` is idempotent and safe to call from another thread: an
    ``execute`` in flight then returns promptly with ``state_lost=True``.
    """

    def execute(self, code: str, timeout_s: float, max_output_chars: int) -> ExecResult: ...

    def close(self) -> None: ...


class SandboxProvider(Protocol):
    """Starts sandboxes. ``start`` writes the task's files, runs its ``setup_code`` and
    returns a ready session; it raises ``SetupError`` if setup_code fails and
    ``SandboxError`` if no sandbox could be started. ``task_id`` labels the sandbox."""

    def start(self, spec: TaskSpec, task_id: str) -> Sandbox: ...


class LazySandbox:
    """A sandbox that is still starting: ``execute`` waits for it, ``close`` always
    reaches it. Lets a worker start the sandbox while the first model call is in flight.

    ``future`` resolves to a started ``Sandbox`` or raises what ``SandboxProvider.start``
    raised (``SetupError``, ``SandboxError``), which the first ``execute`` re-raises.
    ``waited_s`` is how long ``execute`` had to wait for the start, for timings.
    """

    def __init__(self, future: Future[Sandbox]) -> None:
        self._future = future
        self._closed = False
        self.waited_s = 0.0

    def execute(self, code: str, timeout_s: float, max_output_chars: int) -> ExecResult:
        if self._closed:
            return ExecResult(
                state_lost=True, note="The sandbox was closed (the task is stopping)."
            )
        started = time.monotonic()
        try:
            sandbox = self._future.result()
        finally:
            self.waited_s += time.monotonic() - started
        return sandbox.execute(code, timeout_s, max_output_chars)

    def close(self) -> None:
        self._closed = True
        self._future.add_done_callback(_close_started)


def _close_started(future: Future[Sandbox]) -> None:
    if not future.cancelled() and future.exception() is None:
        future.result().close()
