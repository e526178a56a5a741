"""Riding out a Redis restart: a call retried while Redis is unreachable, for a while.

``patiently(op, patience_s)`` runs ``op``; on a connection error, a timeout or a write
refused because Redis is out of memory it waits by
``REDIS_BACKOFF`` and tries again, until waiting longer would pass ``patience_s`` from the
first try: then the last error is raised. Use it only for calls that are harmless to repeat.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import redis

from agent.backoff import Backoff, Jitter

T = TypeVar("T")

# A write refused for memory (maxmemory, noeviction) wrote nothing: like an outage, it is
# waited out, never half-applied.
REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError, redis.exceptions.OutOfMemoryError)
REDIS_BACKOFF = Backoff(0.2, 3.0, Jitter.NONE)  # 0.2 s, 0.4 s, ... then every 3 s


def patiently(
    op: Callable[[], T],
    patience_s: float,
    *,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    deadline = clock() + patience_s
    retry = 0
    while True:
        try:
            return op()
        except REDIS_DOWN:
            retry += 1
            delay = REDIS_BACKOFF.delay_within_s(retry, deadline - clock())
            if delay is None:
                raise
            sleep(delay)
