"""One delivery of one task: claim, run the agent loop, write every step fenced, finish.

``Attempts.run(task_id)`` is what the Celery task calls. It returns ``Done`` (acknowledge the
message) or ``RetryAfter`` (an infrastructure fault: the Celery task re-sends itself after
the delay). Exactly once, in effect:

* ``claim`` drops a delivery of a finished task, or of one a live attempt owns; otherwise it
  takes the lease as attempt + 1, appends ``task.started`` and returns the last checkpoint
  to resume from;
* every event is appended (with the checkpoint after it) before the loop takes its next
  step, fenced by the lease and numbered, so a replaced or stalled attempt writes nothing
  and a retried append writes nothing twice; the reply that answers (only grading follows
  it) is appended by ``FINISH``, the same way, just before the terminal event;
* the result is written by ``FINISH`` once, by the owner of the lease; only that owner
  counts the task in metrics and schedules its webhook.

Agent failures are results, never retried. ``InfrastructureError`` is retried with backoff
until ``max_attempts``; then the task ends ``error``. A lost lease or a cancel request
closes the sandbox and stops the loop at its next check. So does a hand-back (the worker
is stopping, see ``WorkerRuntime.drain``): the task went back to the queue at its
checkpoint, and this attempt ends without writing anything more.

The store is a port (``AttemptStore``: ``store.worker_store.WorkerStore`` in production, an
in-memory fake in the unit tests), and so are the leases' keeper (``Leases``: the
``Heartbeat``) and the sandboxes (``SandboxProvider``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, replace
from typing import Protocol

import structlog

from agent.backoff import Backoff, Jitter
from agent.errors import InfrastructureError
from agent.events import Event, EventType, bound
from agent.llm import LLM
from agent.loop import Checkpoint, Step, finished_event, run_codeact
from agent.models import FailureClass, Result, Status, Timings, Usage
from agent.sandbox import LazySandbox, Sandbox, SandboxProvider
from config.settings import Settings
from engines.re2engine import RE2Engine
from store.keys import LEASE_TTL_S
from store.records import TaskRecord
from store.worker_store import Appended, Claim, Dropped, EventsBehind
from workers import metrics
from workers.leases import Lease

log = structlog.get_logger(__name__)
_RE2 = RE2Engine()


@dataclass(frozen=True, slots=True)
class Done:
    reason: str  # finished, dropped:<why>, fenced


@dataclass(frozen=True, slots=True)
class RetryAfter:
    delay_s: float
    reason: str


class Fenced(Exception):
    """This attempt no longer owns the task; stop writing."""


class Regressed(Exception):
    """Redis lost this attempt's latest writes (a crash within its fsync window)."""


class AttemptStore(Protocol):
    """The store calls an attempt makes, each one round trip (``store.worker_store.WorkerStore``;
    their contracts are its methods'). Per turn an attempt makes one: ``append``."""

    def claim(
        self,
        task_id: str,
        worker_id: str,
        max_attempts: int = 0,
        enqueued_ms: int | None = None,
        batch_id: str | None = None,
    ) -> Claim | Dropped: ...

    def append(
        self, task_id: str, owner: str, event: Event, seq: int, checkpoint: str | None = None
    ) -> Appended: ...

    def release(
        self, task_id: str, owner: str, reclaim_after_s: float, batch_id: str | None = None
    ) -> bool: ...

    def finish(
        self,
        record: TaskRecord,
        owner: str,
        result: Result,
        event: Event,
        last_step: tuple[Event, int] | None = None,
    ) -> str | None: ...

    def get(self, task_id: str) -> TaskRecord | None: ...

    def lease_owner(self, task_id: str) -> str | None: ...


class Leases(Protocol):
    """Who keeps this process's leases alive while their attempts run (``Heartbeat``): it
    stops a lease (``Lease.stop``) that was lost or whose task was cancelled."""

    def add(self, lease: Lease) -> None: ...

    def remove(self, lease: Lease) -> None: ...


class Attempts:
    """Runs deliveries for one worker process; thread-safe (one call per Celery thread)."""

    def __init__(
        self,
        settings: Settings,
        store: AttemptStore,
        llm: LLM,
        provider: SandboxProvider,
        heartbeat: Leases,
        sandbox_starter: Executor,
        *,
        worker_id: str,
        on_finished: Callable[[str], None] = lambda task_id: None,
        sandbox_closer: Executor | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.llm = llm
        self.provider = provider
        self.heartbeat = heartbeat
        self.sandbox_starter = sandbox_starter
        self.worker_id = worker_id
        self.on_finished = on_finished
        self.sandbox_closer = sandbox_closer
        # an infrastructure fault's retries: 2x the delay each time, up to the cap
        self.backoff = Backoff(settings.retry_backoff_s, settings.retry_backoff_max_s, Jitter.NONE)

    def run(
        self, task_id: str, enqueued_ms: int | None = None, batch_id: str | None = None
    ) -> Done | RetryAfter:
        """Run one delivery of ``task_id``, whose message was pushed at ``enqueued_ms`` and
        names ``batch_id`` (see ``WorkerStore.claim``)."""
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(task_id=task_id, worker=self.worker_id)
        claim = self.store.claim(
            task_id, self.worker_id, self.settings.max_attempts, enqueued_ms, batch_id
        )
        if isinstance(claim, Dropped):
            log.info("delivery.dropped", reason=claim.reason)
            metrics.DELIVERIES_DROPPED.labels(claim.reason).inc()
            return Done(f"dropped:{claim.reason}")
        structlog.contextvars.bind_contextvars(attempt=claim.attempt)
        lease = Lease(task_id, claim.owner, claim.attempt, claim.record.batch_id)
        if claim.record.cancel_requested:
            lease.cancelled.set()
        self.heartbeat.add(lease)
        try:
            with metrics.Running():
                return self._run_claimed(claim, lease)
        except Fenced:
            if lease.handed_back.is_set():
                log.info("task.handed_back")
                return Done("handed_back")
            return self._fenced(claim)
        except Regressed:
            log.warning("task.state_regressed")
            if not self.store.release(task_id, claim.owner, LEASE_TTL_S, claim.record.batch_id):
                return self._fenced(claim)
            return RetryAfter(0.5, "state_regressed")
        finally:
            self.heartbeat.remove(lease)
            if lease.sandbox is not None:
                self._dispose(lease.sandbox)

    def _dispose(self, sandbox: Sandbox) -> None:
        """Close a finished attempt's sandbox on the closer when there is one: the kill,
        reap and clean-up then hold up neither this loop's next task nor, run in the lull
        after a wave of a batch ends (``workers.lull``), the other loops finishing or
        starting tasks in that wave's last moments."""
        if self.sandbox_closer is not None:
            try:
                self.sandbox_closer.submit(sandbox.close)
                return
            except RuntimeError:  # the worker is shutting down: close it here
                pass
        sandbox.close()

    # -- the attempt ---------------------------------------------------------------------

    def _run_claimed(self, claim: Claim, lease: Lease) -> Done | RetryAfter:
        record, attempt = claim.record, claim.attempt
        metrics.TASKS_STARTED.inc()
        used = record.attempts_used  # hand-backs by stopping workers use no attempt
        if used > self.settings.max_attempts:
            log.error("task.attempts_exhausted", max_attempts=self.settings.max_attempts)
            return self._finish(
                claim,
                self._error(
                    claim,
                    FailureClass.WORKER_LOST,
                    f"the task's worker was lost {used - 1} times",
                ),
            )
        resume = Checkpoint.from_dict(claim.checkpoint) if claim.checkpoint else None
        seq = claim.seq
        turn = resume.turn if resume else 0
        log.info("task.started", resumed=resume is not None, turn=turn)  # the claim wrote it

        sandbox = LazySandbox(self.sandbox_starter.submit(self._start_sandbox, record))
        lease.sandbox = sandbox
        if lease.stopping():  # cancelled before it started, or lost meanwhile
            sandbox.close()
        model = record.spec.model or self.settings.model
        steps = run_codeact(
            record.spec,
            self.llm,
            sandbox,
            model=model,
            attempt=attempt,
            started_at=claim.started_at,
            resume=resume,
            cancelled=lease.stopping,
            regex=_RE2,
        )
        last: Step | None = None  # the answering reply: FINISH writes it with the result
        try:
            while True:
                step: Step = next(steps)
                if last is not None:  # it was not the last step after all
                    seq = self._append(claim, seq, last.event, last.checkpoint)
                    last = None
                if step.final:
                    last = step
                else:
                    seq = self._append(claim, seq, step.event, step.checkpoint)
                turn = step.event.turn
                self._observe(step)
        except StopIteration as stop:
            result: Result = stop.value
        except InfrastructureError as e:
            steps.close()
            return self._infra_fault(claim, lease, e, seq, turn)
        except (Fenced, Regressed):
            steps.close()
            raise
        if lease.lost.is_set():
            raise Fenced
        if (
            lease.handed_back.is_set()
            and not lease.cancelled.is_set()
            and result.status is Status.CANCELLED
        ):
            raise Fenced  # it stopped because it was handed back: the next attempt goes on
        result = self._with_timings(claim, result, sandbox)
        return self._finish(claim, result, (last.event, seq + 1) if last else None)

    def _start_sandbox(self, record: TaskRecord) -> Sandbox:
        started = time.monotonic()
        sandbox = self.provider.start(record.spec, record.id)
        pool_hit = "true" if sandbox.pool_hit else "false"
        metrics.SANDBOX_ACQUIRE.labels(self.provider.backend, pool_hit).observe(
            time.monotonic() - started
        )
        return sandbox

    def _append(self, claim: Claim, seq: int, event: Event, cp: Checkpoint | None = None) -> int:
        cp_json = _json(cp.to_dict()) if cp is not None else None
        out = self.store.append(claim.record.id, claim.owner, event, seq + 1, cp_json)
        if out is Appended.FENCED:
            raise Fenced
        if out is Appended.GAP:
            raise Regressed
        return seq + 1

    def _observe(self, step: Step) -> None:
        if step.event.type is EventType.EXEC_RESULT:
            duration = step.event.data.get("duration_s")
            if isinstance(duration, int | float):
                metrics.EXEC.labels(self.provider.backend).observe(duration)

    # -- endings -------------------------------------------------------------------------

    def _infra_fault(
        self, claim: Claim, lease: Lease, e: InfrastructureError, seq: int, turn: int
    ) -> Done | RetryAfter:
        fc = FailureClass.of_fault(e)
        if lease.lost.is_set() or lease.handed_back.is_set():  # we closed the sandbox
            raise Fenced
        if lease.cancelled.is_set():
            return self._finish(
                claim,
                replace(
                    self._error(claim, FailureClass.CANCELLED, "cancelled"), status=Status.CANCELLED
                ),
            )
        if not e.retryable or claim.record.attempts_used >= self.settings.max_attempts:
            log.error("task.infra_failed", failure=fc.value, error=repr(e))
            return self._finish(claim, self._error(claim, fc, str(e)))
        delay = self.backoff.delay_s(claim.attempt)
        self._append(
            claim,
            seq,
            Event(
                EventType.RETRYING,
                turn,
                claim.attempt,
                time.time(),
                bound(
                    {
                        "failure_class": fc.value,
                        "error": str(e),
                        "delay_s": delay,
                        "next_attempt": claim.attempt + 1,
                    }
                ),
            ),
        )
        if not self.store.release(
            claim.record.id, claim.owner, delay + LEASE_TTL_S, claim.record.batch_id
        ):
            raise Fenced
        log.warning("task.retrying", failure=fc.value, delay_s=delay, error=repr(e))
        metrics.TASKS_RETRIED.labels(fc.value).inc()
        return RetryAfter(delay, fc.value)

    def _error(self, claim: Claim, fc: FailureClass, message: str) -> Result:
        cp = Checkpoint.from_dict(claim.checkpoint) if claim.checkpoint else None
        return Result(
            Status.ERROR,
            fc,
            attempt=claim.attempt,
            error=message,
            turns=cp.turn if cp else 0,
            usage=cp.usage if cp else Usage(),
            messages=cp.messages if cp else (),
            timings=Timings(total_s=time.time() - claim.started_at),
        )

    def _with_timings(self, claim: Claim, result: Result, sandbox: LazySandbox) -> Result:
        t = result.timings
        queue_s = max(0.0, claim.started_at - claim.record.created_at)
        return replace(result, timings=replace(t, queue_s=queue_s, sandbox_s=sandbox.waited_s))

    def _finish(
        self, claim: Claim, result: Result, last_step: tuple[Event, int] | None = None
    ) -> Done:
        event = finished_event(result, time.time())
        try:
            written = self.store.finish(claim.record, claim.owner, result, event, last_step)
        except EventsBehind:
            raise Regressed from None
        if written is None:
            raise Fenced
        log.info(
            "task.finished",
            status=result.status.value,
            failure=result.failure_class.value if result.failure_class else None,
            turns=result.turns,
        )
        metrics.TASKS_FINISHED.labels(result.status.value).inc()
        metrics.TASK_DURATION.observe(result.timings.total_s)
        metrics.TASK_TURNS.observe(result.turns)
        if claim.record.spec.webhook is not None:
            self.on_finished(claim.record.id)
        return Done("finished")

    def _fenced(self, claim: Claim) -> Done | RetryAfter:
        """This attempt lost the task. Someone else runs or finished it, unless the lease
        simply vanished (e.g. Redis lost its last second of writes): then re-send it."""
        record = self.store.get(claim.record.id)
        owner = self.store.lease_owner(claim.record.id)
        log.warning(
            "task.fenced_out", owner_now=owner, status=record.status.value if record else None
        )
        if record is None or record.status.terminal or owner is not None:
            return Done("fenced")
        return RetryAfter(1.0, "lease_vanished")


def _json(d: object) -> str:
    return json.dumps(d, separators=(",", ":"), ensure_ascii=False)
