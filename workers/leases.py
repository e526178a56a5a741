"""The leases a worker process holds, and the heartbeat thread that keeps them.

One ``Heartbeat`` per worker process renews every lease it holds in one pipelined round
trip per tick. The same round trip reads each task's cancel flag: a cancelled task, or one
whose lease was lost, has its sandbox closed at once (an execution in flight returns within
a couple of seconds) and its ``Lease.stopping()`` turns true, which the agent loop polls.
A second round trip publishes the worker's status key and reads the queues' depth, which
feeds the ``ConsumerWatch`` (``workers.health``) that tells a dead broker consumer.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import redis
import structlog

from agent.sandbox import Sandbox
from store import keys
from store.keys import HEARTBEAT_INTERVAL_S, WORKER_TTL_S
from store.worker_store import WorkerStore
from workers import metrics
from workers.health import ConsumerWatch

log = structlog.get_logger(__name__)


@dataclass(eq=False)
class Lease:
    task_id: str
    owner: str  # "{worker_id}/{attempt}"
    attempt: int
    batch_id: str | None = None  # the task's batch, whose counts move when it is handed back
    cancelled: threading.Event = field(default_factory=threading.Event)
    lost: threading.Event = field(default_factory=threading.Event)
    handed_back: threading.Event = field(default_factory=threading.Event)  # worker stopping
    sandbox: Sandbox | None = None  # closed when the lease stops
    _closed: bool = False

    def stopping(self) -> bool:
        return self.cancelled.is_set() or self.lost.is_set() or self.handed_back.is_set()

    def stop(self, why: threading.Event) -> None:
        """Set ``why`` and close the sandbox (once), so an execution in flight returns."""
        why.set()
        if self._closed or self.sandbox is None:
            return
        self._closed = True
        try:
            self.sandbox.close()
        except Exception:  # closing is best effort; the loop ends either way
            log.exception("sandbox.close_failed", task_id=self.task_id)


class Heartbeat:
    """Renews this process's leases every ``interval_s`` from a daemon thread."""

    def __init__(
        self,
        store: WorkerStore,
        worker_id: str,
        interval_s: float = HEARTBEAT_INTERVAL_S,
        *,
        consumer: ConsumerWatch | None = None,
        held: Callable[[], int] = lambda: 0,
        slots: int = 1,
    ) -> None:
        self.store = store
        self.worker_id = worker_id
        self.interval_s = interval_s
        self.consumer = consumer
        self.held = held  # messages the consumer holds now (running or about to run)
        self.slots = slots  # how many it may hold
        self._leases: dict[str, Lease] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_ok: float | None = None  # monotonic time of the last tick Redis answered
        # extra facts for the worker's status key (e.g. the warm pool's size)
        self.status: Callable[[], dict[str, object]] = dict

    def add(self, lease: Lease) -> None:
        with self._lock:
            self._leases[lease.task_id] = lease

    def remove(self, lease: Lease) -> None:
        with self._lock:
            if self._leases.get(lease.task_id) is lease:
                del self._leases[lease.task_id]

    def leases(self) -> list[Lease]:
        with self._lock:
            return list(self._leases.values())

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop beating and withdraw the status key: this worker is gone."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        # Best effort: the key expires within WORKER_TTL_S anyway.
        with contextlib.suppress(redis.ConnectionError, redis.TimeoutError):
            pipe = self.store.r.pipeline(transaction=False)
            pipe.delete(self.store.keys.worker(self.worker_id))
            pipe.zrem(self.store.keys.workers, self.worker_id)
            pipe.execute()

    def beat(self) -> None:
        """One tick: renew leases, apply cancel requests, publish liveness and gauges."""
        leases = self.leases()
        states = self.store.renew((le.task_id, le.owner, le.attempt) for le in leases)
        for lease in leases:
            state = states.get(lease.task_id)
            if state is None or state.ended:  # it just finished or was released: not lost
                continue
            if not state.held and not lease.lost.is_set():
                log.warning("lease.lost", task_id=lease.task_id, owner=lease.owner)
                lease.stop(lease.lost)
            elif state.cancel_requested and not lease.cancelled.is_set():
                log.info("task.cancel_seen", task_id=lease.task_id)
                lease.stop(lease.cancelled)
        pipe = self.store.broker.pipeline(transaction=False)
        for name in metrics.queue_names(keys.TASK_QUEUE):
            pipe.llen(name)
        depths = [int(n) for n in pipe.execute()]
        metrics.QUEUE_DEPTH.set(sum(depths))
        status = {"leases": len(leases), **self.status()}
        if self.consumer is not None:
            self.consumer.observe(queued=sum(depths), held=self.held(), slots=self.slots)
            status["consumer"] = self.consumer.state
        k = self.store.keys
        pipe = self.store.r.pipeline(transaction=False)
        pipe.set(k.worker(self.worker_id), json.dumps(status), ex=int(WORKER_TTL_S))
        pipe.zadd(k.workers, {self.worker_id: time.time()})
        pipe.execute()
        self.last_ok = time.monotonic()

    def redis_ok(self) -> bool:
        """Did Redis answer a tick recently?"""
        last = self.last_ok
        return last is not None and time.monotonic() - last < max(3 * self.interval_s, 10.0)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.beat()
            except (redis.ConnectionError, redis.TimeoutError) as e:
                log.warning("heartbeat.redis_unavailable", error=repr(e))
            except Exception:
                log.exception("heartbeat.failed")
