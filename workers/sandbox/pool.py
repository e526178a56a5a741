"""A warm pool: items (pre-started sandbox containers) made ahead of demand.

The pool knows nothing about Docker: it is given ``create`` and ``destroy`` callables and
keeps between ``min_size`` and ``max_size`` ready items. Items are single use: ``acquire``
hands one out for good (a sandbox is disposable) and a maintainer thread makes another;
``creators`` maintainer threads make items side by side.

Sizing: the pool aims at ``target`` idle items, starting at ``min_size``. A miss (``acquire``
found nothing usable) raises ``target`` by one, up to ``max_size``; after ``idle_ttl_s``
without an acquire, ``target`` falls back to ``min_size`` and surplus items idle for longer
than ``idle_ttl_s`` are destroyed. Any item older than ``max_age_s`` is destroyed and, while
under ``target``, replaced. ``stats()`` reports hits and misses for the
``actfleet_sandbox_acquire_seconds{pool_hit}`` metric.

Pacing: refills wait for a lull. While items are being handed out, the maintainer makes
nothing until ``refill_quiet_s`` has passed without a hit, so a burst of task starts
(a whole wave of a batch) does not compete with a burst of sandbox starts for the CPU; the
items are made in the quiet that follows, while the tasks wait on their model (by more than
one creator, so that a wave's refills are done before its tasks' replies come back). A miss
(demand outran the pool) ends the wait at once.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import structlog

from agent.sandbox import PoolStats

__all__ = ["PoolStats", "WarmPool"]

T = TypeVar("T")

log = structlog.get_logger(__name__)

_MAX_BACKOFF_S = 30.0


@dataclass(slots=True)
class _Entry(Generic[T]):
    item: T
    created_at: float
    idle_since: float


class WarmPool(Generic[T]):
    """Pre-made items with min/max size, idle expiry and a maximum age.

    ``create()`` makes one ready item (it may block for a second; it runs on the pool's own
    thread); ``destroy(item)`` disposes of one and must not raise. ``healthy(item)`` (cheap,
    called under the pool's lock on acquire) rejects items that died while idle. Call
    ``start()`` to begin filling and ``close()`` to stop and destroy every idle item.
    """

    def __init__(
        self,
        create: Callable[[], T],
        destroy: Callable[[T], None],
        *,
        min_size: int = 1,
        max_size: int = 4,
        idle_ttl_s: float = 300.0,
        max_age_s: float = 1800.0,
        refill_quiet_s: float = 0.25,
        creators: int = 1,
        healthy: Callable[[T], bool] | None = None,
        name: str = "pool",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 <= min_size <= max_size:
            raise ValueError(f"need 0 <= min_size <= max_size, got {min_size}, {max_size}")
        if creators < 1:
            raise ValueError(f"need at least one creator, got {creators}")
        self._create = create
        self._destroy = destroy
        self._healthy = healthy
        self.min_size = min_size
        self.max_size = max_size
        self.idle_ttl_s = idle_ttl_s
        self.max_age_s = max_age_s
        self.refill_quiet_s = refill_quiet_s
        self.creators = creators
        self.name = name
        self._clock = clock
        self._cond = threading.Condition()
        self._idle: deque[_Entry[T]] = deque()
        self._starting = 0
        self._target = min_size
        self._last_acquire = clock()
        self._last_hit = float("-inf")  # refills wait refill_quiet_s after it
        self._missed = False  # a miss since the pool was last full: refill without waiting
        self._closed = False
        self._threads: list[threading.Thread] = []
        self.hits = 0
        self.misses = 0
        self._created = 0
        self._destroyed = 0
        self._failures = 0

    # -- public ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the maintainer threads (idempotent)."""
        with self._cond:
            if self._threads or self._closed:
                return
            self._threads = [
                threading.Thread(target=self._maintain, name=f"warm-pool-{self.name}", daemon=True)
                for _ in range(self.creators)
            ]
            for t in self._threads:
                t.start()

    def acquire(self, accept: Callable[[T], bool] | None = None) -> T | None:
        """Take a ready item, or ``None`` (a miss) if none is usable. Never blocks on I/O.

        ``accept`` filters items (e.g. one whose remaining lifetime is too short); items it
        rejects stay in the pool.
        """
        doomed: list[T] = []
        try:
            with self._cond:
                now = self._clock()
                self._last_acquire = now
                found: _Entry[T] | None = None
                for entry in list(self._idle):
                    if now - entry.created_at > self.max_age_s or (
                        self._healthy is not None and not self._healthy(entry.item)
                    ):
                        self._idle.remove(entry)
                        doomed.append(entry.item)
                        continue
                    if accept is None or accept(entry.item):
                        found = entry
                        break
                if found is not None:
                    self._idle.remove(found)
                    self.hits += 1
                    self._last_hit = now
                else:
                    self.misses += 1
                    self._missed = True
                    self._target = min(self.max_size, self._target + 1)
                self._cond.notify_all()
                return found.item if found is not None else None
        finally:
            for item in doomed:
                self._discard(item)

    def stats(self) -> PoolStats:
        with self._cond:
            return PoolStats(
                hits=self.hits,
                misses=self.misses,
                idle=len(self._idle),
                starting=self._starting,
                target=self._target,
                created=self._created,
                destroyed=self._destroyed,
                failures=self._failures,
            )

    def wait_ready(self, count: int | None = None, timeout_s: float = 30.0) -> bool:
        """Block until ``count`` (default ``min_size``) items are idle; for start-up and tests."""
        want = self.min_size if count is None else count
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while len(self._idle) < want:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closed:
                    return False
                self._cond.wait(remaining)
            return True

    def close(self) -> None:
        """Stop the maintainer and destroy every idle item. Items handed out are the
        caller's. Items still being created are destroyed as soon as they are made."""
        with self._cond:
            self._closed = True
            doomed = [e.item for e in self._idle]
            self._idle.clear()
            self._cond.notify_all()
            threads = list(self._threads)
        for item in doomed:
            self._discard(item)
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(timeout=10)

    # -- maintainer -----------------------------------------------------------------------

    def _maintain(self) -> None:
        backoff_s = 0.0
        while True:
            doomed: list[T] = []
            with self._cond:
                if self._closed:
                    return
                now = self._clock()
                self._expire(now, doomed)
                need = self._target - len(self._idle) - self._starting
                lull_in = self._last_hit + self.refill_quiet_s - now
                if need <= 0 or doomed:
                    if not doomed:
                        self._missed = False  # full again, counting items being made
                        self._cond.wait(self._next_wakeup_s(now))
                    need = 0
                elif lull_in > 0 and not self._missed:
                    self._cond.wait(lull_in)  # a hit meanwhile pushes the lull back
                    need = 0
                else:
                    self._starting += 1
            for item in doomed:
                self._discard(item)
            if need <= 0:
                continue
            if backoff_s:
                time.sleep(backoff_s)
            try:
                item = self._create()
            except Exception as e:  # create's failures are the pool's to absorb
                with self._cond:
                    self._starting -= 1
                    self._failures += 1
                backoff_s = min(_MAX_BACKOFF_S, max(0.5, backoff_s * 2))
                log.warning("pool.create_failed", pool=self.name, error=repr(e), retry_s=backoff_s)
                continue
            backoff_s = 0.0
            with self._cond:
                self._starting -= 1
                self._created += 1
                if self._closed:
                    doomed.append(item)
                else:
                    now = self._clock()
                    self._idle.append(_Entry(item, now, now))
                    self._cond.notify_all()
            for item in doomed:
                self._discard(item)

    def _expire(self, now: float, doomed: list[T]) -> None:
        """Under the lock: drop items past ``max_age_s`` and, once demand has been quiet for
        ``idle_ttl_s``, shrink to ``min_size``."""
        for entry in list(self._idle):
            if now - entry.created_at > self.max_age_s:
                self._idle.remove(entry)
                doomed.append(entry.item)
        if now - self._last_acquire > self.idle_ttl_s:
            self._target = self.min_size
        while len(self._idle) > self._target:
            oldest = self._idle[0]
            if now - oldest.idle_since <= self.idle_ttl_s:
                break
            self._idle.popleft()
            doomed.append(oldest.item)

    def _next_wakeup_s(self, now: float) -> float:
        wake = [e.created_at + self.max_age_s for e in self._idle]
        if self._target > self.min_size:
            wake.append(self._last_acquire + self.idle_ttl_s)
        if len(self._idle) > self._target:
            wake.append(self._idle[0].idle_since + self.idle_ttl_s)
        future = [t - now for t in wake if t > now]
        return max(0.01, min([60.0, *future]))

    def _discard(self, item: T) -> None:
        with self._cond:
            self._destroyed += 1
        try:
            self._destroy(item)
        except Exception as e:  # destroy must not take the pool down
            log.warning("pool.destroy_failed", pool=self.name, error=repr(e))
