"""The model-server permits one worker process holds, handed to its threads in turn.

``Permits`` is a counting semaphore whose size (``granted``) the process's gate sets from
the fleet's answer, and which may shrink below what is in use (the fleet lowered its limit,
or another worker is owed its share): then nobody gets a permit until enough come back.
Waiting threads are served first come, first served, and a released permit is handed
straight to the oldest waiter, so a thread arriving later cannot overtake one that waits.
No I/O; the uncontended path is one lock round.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import NamedTuple


class _Waiter:
    __slots__ = ("granted", "lock")

    def __init__(self) -> None:
        self.granted = False
        self.lock = threading.Lock()
        self.lock.acquire()  # released by the thread that hands this waiter a permit


class Usage(NamedTuple):
    granted: int
    in_use: int
    waiting: int


class Permits:
    """``on_starved`` is called (outside the lock) when a thread starts waiting while no
    other does: the gate's cue to ask the fleet for more."""

    def __init__(
        self,
        on_starved: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._lock = threading.Lock()
        self._granted = 0
        self._in_use = 0
        self._queue: deque[_Waiter] = deque()
        self._on_starved = on_starved
        self._clock = clock

    def acquire(self, deadline: float | None) -> bool:
        """Take a permit, waiting until ``deadline`` (the ``clock``'s time; None: no limit).
        False when the deadline came first."""
        with self._lock:
            if not self._queue and self._in_use < self._granted:
                self._in_use += 1
                return True
            waiter = _Waiter()
            self._queue.append(waiter)
            first = len(self._queue) == 1
        if first:
            self._on_starved()
        while True:
            if deadline is None:
                waiter.lock.acquire()
            else:
                remaining = deadline - self._clock()
                if remaining > 0:
                    waiter.lock.acquire(timeout=remaining)
            with self._lock:
                if waiter.granted:
                    return True
                if deadline is not None and self._clock() >= deadline:
                    self._queue.remove(waiter)
                    return False

    def release(self) -> None:
        with self._lock:
            if self._in_use <= 0:
                raise RuntimeError("release() without a permit in use")
            self._in_use -= 1
            self._hand_out()

    def set_granted(self, granted: int) -> None:
        with self._lock:
            self._granted = max(granted, 0)
            self._hand_out()

    def usage(self) -> Usage:
        with self._lock:
            return Usage(self._granted, self._in_use, len(self._queue))

    def _hand_out(self) -> None:
        while self._queue and self._in_use < self._granted:
            waiter = self._queue.popleft()
            waiter.granted = True
            self._in_use += 1
            waiter.lock.release()
