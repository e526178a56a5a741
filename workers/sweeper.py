"""Recovering tasks whose worker died, or whose message was lost, from any live worker.

The broker's visibility timeout is long (it must exceed the longest task), so a dead
worker's message would sit unacknowledged for hours. Instead, a task's lease expires within
``LEASE_TTL_S`` of its last heartbeat, and every live worker runs a ``Sweeper`` that, every
``interval_s``, hands such tasks back to the queue (a new message; the new attempt resumes
from the last checkpoint) or, once they used up ``max_attempts``, finishes them as
``error``/``worker_lost``.

A queued task can lose its message too (a Redis crash right after it was accepted, a
worker killed between popping a message and claiming it, a message deleted by hand). The
same sweep gives such a task a new message once its message should have been taken
(``WorkerStore.requeue_lost``): the queue is FIFO, so that is when a message pushed more
than ``queued_grace_s`` later was taken, or when the queue has been empty for that long.
A task waiting behind a backlog is never pushed twice. The Lua scripts make each decision
once, whichever worker sweeps first.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import redis
import structlog

from agent.loop import finished_event
from agent.models import FailureClass, Result, Status, Timings
from store import keys
from store.worker_store import WorkerStore
from workers import metrics

log = structlog.get_logger(__name__)


class Sweeper:
    def __init__(
        self,
        store: WorkerStore,
        worker_id: str,
        *,
        max_attempts: int,
        enqueue: Callable[[str, int], None],
        on_finished: Callable[[str], None] = lambda task_id: None,
        interval_s: float = 5.0,
        grace_s: float = 10.0,
        queued_grace_s: float = 60.0,
    ) -> None:
        self.store = store
        self.worker_id = worker_id
        self.max_attempts = max_attempts
        self.enqueue = enqueue  # (task id, push time in unix ms)
        self.on_finished = on_finished
        self.interval_s = interval_s
        self.grace_s = grace_s
        self.queued_grace_s = queued_grace_s
        self._queue_was_empty = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="sweeper", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def sweep(self) -> int:
        """One pass; returns how many tasks it dealt with."""
        out = self.store.sweep(f"sweeper:{self.worker_id}", self.max_attempts, self.grace_s)
        for task_id in out.requeue:
            log.warning("task.requeued", task_id=task_id, reason="lease_expired")
            metrics.TASKS_RETRIED.labels("lease_expired").inc()
            self.enqueue(task_id, out.enqueued_ms)
        for task_id, owner in out.exhausted:
            self._give_up(task_id, owner)
        lost = self.store.requeue_lost(
            self.queued_grace_s, metrics.queue_names(keys.TASK_QUEUE), self._queue_was_empty
        )
        self._queue_was_empty = lost.queue_empty
        for task_id in lost.requeue:
            log.warning("task.requeued", task_id=task_id, reason="message_lost")
            metrics.TASKS_RETRIED.labels("message_lost").inc()
            self.enqueue(task_id, lost.enqueued_ms)
        return len(out.requeue) + len(out.exhausted) + len(lost.requeue)

    def _give_up(self, task_id: str, owner: str) -> None:
        record = self.store.get(task_id)
        if record is None:
            return
        now = time.time()
        result = Result(
            Status.ERROR,
            FailureClass.WORKER_LOST,
            attempt=record.attempt,
            timings=Timings(total_s=now - (record.started_at or now)),
            error=f"the task's worker was lost {record.attempt} times",
        )
        if self.store.finish(record, owner, result, finished_event(result, now)):
            log.error("task.finished", task_id=task_id, status="error", failure="worker_lost")
            metrics.TASKS_FINISHED.labels(Status.ERROR.value).inc()
            self.on_finished(task_id)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sweep()
            except (redis.ConnectionError, redis.TimeoutError) as e:
                log.warning("sweeper.redis_unavailable", error=repr(e))
            except Exception:
                log.exception("sweeper.failed")
