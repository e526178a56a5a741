"""The gate in front of runner launches: a few at once, a task's before the pool's.

A launch is CPU-bound (namespaces, an interpreter's start), so a process lets only a few run
at once: a wave of cold starts that all ran together would share the cores among all of them
and each would pass its start timeout. Behind the gate they wait their turn instead.

Two kinds of caller share it: a task that found the warm pool empty and is waiting for its
sandbox (``urgent``), and the pool's own refills, which nobody waits for. A plain semaphore
let the refills starve the tasks: a refill thread that releases a slot takes it again before
the woken task runs (the releasing thread is on a core, the woken one is not), so under a
busy refill the tasks that missed the pool waited until the pool was full again (13-16 s
for 89 tasks in ``bench fleet --tasks 900 --concurrency 300``, while later tasks got warm
sandboxes at once). Here slots are handed over, first come first served, urgent callers
first: a released slot goes to the longest-waiting urgent caller, else to the
longest-waiting refill, and nobody barges past a waiter.
"""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from collections.abc import Iterator


class LaunchGate:
    """At most ``slots`` holders at once; waiters served in order, ``urgent`` ones first."""

    def __init__(self, slots: int) -> None:
        if slots < 1:
            raise ValueError(f"need at least one launch slot, got {slots}")
        self.slots = slots
        self._lock = threading.Lock()
        self._free = slots
        self._urgent: deque[threading.Event] = deque()
        self._background: deque[threading.Event] = deque()

    @contextlib.contextmanager
    def slot(self, *, urgent: bool) -> Iterator[None]:
        """Hold one slot for the body, waiting (uninterruptibly) for it if needed."""
        self.acquire(urgent=urgent)
        try:
            yield
        finally:
            self.release()

    def acquire(self, *, urgent: bool) -> None:
        with self._lock:
            if self._free and not self._urgent and (urgent or not self._background):
                self._free -= 1
                return
            turn = threading.Event()
            (self._urgent if urgent else self._background).append(turn)
        turn.wait()  # release() took the slot on our behalf before setting it

    def release(self) -> None:
        with self._lock:
            queue = self._urgent or self._background
            if queue:
                queue.popleft().set()  # the slot passes straight to the next waiter
            else:
                self._free = min(self.slots, self._free + 1)

    def waiting(self) -> tuple[int, int]:
        """(urgent, background) callers waiting for a slot now."""
        with self._lock:
            return len(self._urgent), len(self._background)
