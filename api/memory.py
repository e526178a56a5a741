"""Refusing new work while Redis is near its memory limit, before any of it is written.

Redis runs with ``maxmemory`` and ``noeviction`` (deploy/README.md): past the limit it
refuses writes, and a submission refused half way would be work lost. So the API reads
``used_memory`` and ``maxmemory`` (``INFO memory``, at most once per ``CACHE_S``, shared by
every request) and answers new tasks and batches 503 with ``Retry-After`` once
``used_memory`` is above ``redis_memory_high_fraction`` of ``maxmemory``. Work already
accepted is not refused: the margin above the fraction is what the running tasks write.
Without ``maxmemory`` (0) nothing is refused here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from api.errors import ApiError

CACHE_S = 1.0


@dataclass(frozen=True, slots=True)
class MemoryState:
    used_bytes: int
    max_bytes: int  # 0: no limit
    high_fraction: float

    @property
    def fraction(self) -> float | None:
        return self.used_bytes / self.max_bytes if self.max_bytes else None

    @property
    def high(self) -> bool:
        return bool(self.max_bytes) and self.used_bytes > self.high_fraction * self.max_bytes

    def public(self) -> dict[str, Any]:
        return {
            "used_bytes": self.used_bytes,
            "max_bytes": self.max_bytes,
            "used_fraction": None if self.fraction is None else round(self.fraction, 4),
            "high_fraction": self.high_fraction,
            "accepting": not self.high,
        }


class MemoryGuard:
    def __init__(
        self,
        client: aioredis.Redis,
        high_fraction: float,
        retry_after_s: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.high_fraction = high_fraction
        self.retry_after_s = retry_after_s
        self.clock = clock
        self._state: MemoryState | None = None
        self._read_at = float("-inf")

    async def state(self) -> MemoryState:
        """Redis' memory use, read at most once per ``CACHE_S``. Raises Redis errors."""
        if self._state is None or self.clock() - self._read_at >= CACHE_S:
            info = await self.client.info("memory")
            self._state = MemoryState(
                int(info["used_memory"]), int(info.get("maxmemory", 0)), self.high_fraction
            )
            self._read_at = self.clock()
        return self._state

    def saw_full(self) -> None:
        """A write was refused for memory: read the figures afresh next time."""
        self._read_at = float("-inf")

    async def check(self) -> None:
        """503 with ``Retry-After`` while Redis is above the high fraction of its limit."""
        state = await self.state()
        if state.high:
            raise ApiError(
                503,
                f"the store (Redis) is {state.fraction:.0%} full (new work is refused above "
                f"{self.high_fraction:.0%}, ACTFLEET_REDIS_MEMORY_HIGH_FRACTION): try again "
                "later",
                headers={"Retry-After": str(self.retry_after_s)},
                used_bytes=state.used_bytes,
                max_bytes=state.max_bytes,
            )
