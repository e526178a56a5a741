"""Stopping a worker without losing or repeating work: on SIGTERM, or when its consumer died.

Celery's warm shutdown stops the broker consumer, so the worker takes no new task, and
then waits for the tasks it runs, however long they take. ``Drain`` bounds that wait:
each running task gets ``grace_s`` to finish; then every one still running is handed
back (``WorkerStore.hand_back``: lease released, task queued again at its checkpoint, no
attempt used), given a new message, and its sandbox is closed, so its thread returns
within seconds and whatever it still tries to write is fenced out. A thread stuck in a
long model call must not hold the exit either: once everything is handed back, the
process exits ``exit_after_s`` later even if Celery is still waiting for it.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

import redis
import structlog

from store.worker_store import WorkerStore
from workers import metrics
from workers.leases import Heartbeat, Lease

log = structlog.get_logger(__name__)

EXIT_AFTER_S = 15.0  # after the hand-backs, how long Celery may take to wind down


class Drain:
    def __init__(
        self,
        store: WorkerStore,
        heartbeat: Heartbeat,
        enqueue: Callable[[str, int], None],
        grace_s: float,
        *,
        exit_after_s: float = EXIT_AFTER_S,
        exit_process: Callable[[int], object] = os._exit,
    ) -> None:
        self.store = store
        self.heartbeat = heartbeat
        self.enqueue = enqueue  # (task id, push time in unix ms)
        self.grace_s = grace_s
        self.exit_after_s = exit_after_s
        self.exit_process = exit_process
        self.exit_code = 0
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._done = threading.Event()  # the process is closing normally

    @property
    def started(self) -> bool:
        return self._thread is not None

    def start(self, exit_code: int = 0) -> None:
        """Begin; returns at once (it may run in a signal handler). Later calls do
        nothing but raise the exit status."""
        with self._lock:
            self.exit_code = max(self.exit_code, exit_code)
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._run, name="drain", daemon=True)
        self._thread.start()

    def closed(self) -> None:
        """The process is exiting by itself: no forced exit needed."""
        self._done.set()

    def _run(self) -> None:
        log.info("worker.draining", grace_s=self.grace_s, running=len(self.heartbeat.leases()))
        deadline = time.monotonic() + self.grace_s
        while self.heartbeat.leases() and time.monotonic() < deadline:
            time.sleep(0.1)
        for lease in self.heartbeat.leases():
            self.hand_back(lease)
        if not self._done.wait(self.exit_after_s):
            log.warning("worker.exit_forced", after_s=self.exit_after_s)
            self.exit_process(self.exit_code)

    def hand_back(self, lease: Lease) -> None:
        lease.handed_back.set()  # first: the task's thread then takes its fencing as intended
        try:
            pushed = self.store.hand_back(lease.task_id, lease.owner, lease.batch_id)
        except (redis.ConnectionError, redis.TimeoutError) as e:
            # Its lease expires and a sweeper requeues it, as for a worker that died.
            log.error("task.hand_back_failed", task_id=lease.task_id, error=repr(e))
            pushed = None
        lease.stop(lease.handed_back)  # close the sandbox: an execution in flight returns
        if pushed is None:
            return  # it finished meanwhile, or Redis is away
        log.warning("task.handed_back", task_id=lease.task_id, reason="shutdown")
        metrics.TASKS_RETRIED.labels("shutdown").inc()
        try:
            self.enqueue(lease.task_id, pushed)
        except Exception as e:  # the queued index still has it: a sweeper re-sends it
            log.error("task.enqueue_failed", task_id=lease.task_id, error=repr(e))
