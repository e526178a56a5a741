"""The sandbox port: where the model's code runs.

A ``Sandbox`` is one stateful Python session (a notebook kernel, in effect) inside a
disposable isolation boundary. ``SandboxProvider.start`` makes one for a task, with the
task's files written into the work dir and its ``setup_code`` already run. The provider
is everything a worker needs of a backend: it keeps a warm pool (``start_pool``,
``pool_stats``), clears what dead workers left behind (``start_housekeeping``) and is
closed once (``close``). Every backend meets the same contract: the same fault gives the
same outcome whichever backend runs (``tests/integration/test_sandbox_contract.py``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, fields
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
    ``SandboxError`` only for our own faults (no new session could be started after a
    loss, or the runner died while the task's files were written into it). A model's
    doing is always a result: a lost session, or setup_code failing in the new session
    after a restart (``error`` then holds its traceback and the code was not run).
    ``close`` is idempotent and safe to call from another thread: an ``execute`` in
    flight then returns promptly with ``state_lost=True``. ``pool_hit`` says whether the
    sandbox was handed out by a warm pool (for the acquire metric).
    """

    @property
    def pool_hit(self) -> bool: ...

    def execute(self, code: str, timeout_s: float, max_output_chars: int) -> ExecResult: ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class PoolStats:
    """What a provider's warm pools hold and did (summed over its pools)."""

    hits: int = 0  # starts served by a pool
    misses: int = 0  # starts a pool could not serve
    idle: int = 0  # ready sandboxes waiting
    starting: int = 0  # sandboxes being made now
    target: int = 0  # idle sandboxes the pools aim at
    created: int = 0
    destroyed: int = 0  # expired, surplus, unhealthy or left at close
    failures: int = 0  # a pool could not make a sandbox

    def __add__(self, other: PoolStats) -> PoolStats:
        return PoolStats(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))


class SandboxProvider(Protocol):
    """Starts sandboxes; what a worker needs of a backend.

    ``start`` writes the task's files, runs its ``setup_code`` and returns a ready session;
    it raises ``SetupError`` if a file is refused or setup_code fails (the task's fault),
    ``SandboxRefused`` if the spec asks for what the server does not allow, and
    ``SandboxError`` if no sandbox could be started or its runner died before setup_code
    (retried). ``task_id`` labels the sandbox.

    ``start_pool`` begins keeping sandboxes started ahead of demand (a no-op for a provider
    made without a pool); ``pool_stats`` reports on them. ``start_housekeeping`` removes
    what dead workers' sandboxes left behind (``is_worker_alive(worker_id)`` tells the
    dead), returns how many it removed, and goes on doing so in the background where
    leftovers can appear later. ``close`` stops the pool and the housekeeping and removes
    the idle sandboxes (not the ones handed out: close those). ``backend`` names it in
    metrics and reports.
    """

    backend: str

    def start(self, spec: TaskSpec, task_id: str) -> Sandbox: ...

    def start_pool(self) -> None: ...

    def pool_stats(self) -> PoolStats: ...

    def start_housekeeping(self, is_worker_alive: Callable[[str], bool]) -> int: ...

    def close(self) -> None: ...


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

    @property
    def pool_hit(self) -> bool:
        """The started sandbox's ``pool_hit`` (False while it is still starting)."""
        future = self._future
        if not future.done() or future.cancelled() or future.exception() is not None:
            return False
        return future.result().pool_hit

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
