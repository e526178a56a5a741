"""An executor for work that can wait: it runs what it is given once submissions pause.

Finished tasks' sandboxes are closed this way. In a batch, a whole wave of tasks finishes
within a fraction of a second, and the next wave starts in the same moment: every loop of a
worker process is then finishing a task or starting one, under one GIL, on a machine whose
cores are busy. Closing a sandbox (kill, reap, remove its files and cgroups, and the
kernel's teardown of its namespaces) is work nobody waits for, so it waits for the lull
that follows, while the new tasks wait on their model.

``LullExecutor.submit`` queues a call; the executor's threads run the queue once no call
was submitted for ``quiet_s``, or once the oldest queued call has waited ``max_wait_s``
(steady demand has no lull). ``shutdown(wait=True)`` runs what is queued at once and
returns when all of it has run.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any

import structlog

log = structlog.get_logger(__name__)


class LullExecutor(Executor):
    def __init__(
        self,
        threads: int = 1,
        *,
        quiet_s: float = 0.25,
        max_wait_s: float = 2.0,
        name: str = "lull",
    ) -> None:
        if threads < 1 or quiet_s < 0 or max_wait_s < quiet_s:
            raise ValueError("need threads >= 1 and 0 <= quiet_s <= max_wait_s")
        self.quiet_s = quiet_s
        self.max_wait_s = max_wait_s
        self._cond = threading.Condition()
        self._queue: deque[tuple[float, Future[Any], Callable[[], Any]]] = deque()
        self._last_submit = float("-inf")
        self._draining = False  # the lull came: run until the queue is empty
        self._shutdown = False
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
            for i in range(threads)
        ]
        self._started = False

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        with self._cond:
            if self._shutdown:
                raise RuntimeError("cannot submit after shutdown")
            if not self._started:
                self._started = True
                for t in self._threads:
                    t.start()
            now = time.monotonic()
            self._last_submit = now
            self._queue.append((now, future, lambda: fn(*args, **kwargs)))
            self._cond.notify_all()
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._cond:
            self._shutdown = True
            if cancel_futures:
                while self._queue:
                    self._queue.popleft()[1].cancel()
            self._cond.notify_all()
            started = self._started
        if wait and started:
            for t in self._threads:
                t.join()

    def _next(self) -> tuple[Future[Any], Callable[[], Any]] | None:
        """The next call to run, once its time has come; None when shut down and empty."""
        with self._cond:
            while True:
                if not self._queue:
                    if self._shutdown:
                        return None
                    self._draining = False
                    self._cond.wait()
                    continue
                now = time.monotonic()
                oldest = self._queue[0][0]
                due_in = min(self._last_submit + self.quiet_s - now, oldest + self.max_wait_s - now)
                if self._shutdown or self._draining or due_in <= 0:
                    self._draining = True
                    _, future, call = self._queue.popleft()
                    return future, call
                self._cond.wait(due_in)

    def _work(self) -> None:
        while (job := self._next()) is not None:
            future, call = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(call())
            except BaseException as e:  # the caller's to see on the future
                log.warning("lull.call_failed", error=repr(e))
                future.set_exception(e)
