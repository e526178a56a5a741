"""Exponential backoff, the one rule every retry in actfleet waits by.

Retry ``n`` (1 = the first retry) waits up to ``min(max_s, base_s * 2**(n - 1))`` (the
*ceiling*), drawn by the policy's jitter:

* ``FULL``: uniform in ``[0, ceiling]`` (callers that fail together spread out the most);
* ``EQUAL``: uniform in ``[ceiling / 2, ceiling)`` (spread, yet never much sooner than
  planned);
* ``NONE``: exactly the ceiling.

A server's ``Retry-After`` wins over the draw: the delay is then exactly what it asked,
clamped to ``[0, max_s]``. ``delay_within_s`` also keeps a deadline: it says ``None`` when
the wait would end past it (give up).

Pure: the random draw is an argument (``rand``, uniform in ``[0, 1)``), so tests pin it.
"""

from __future__ import annotations

import email.utils
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum

_MAX_DOUBLINGS = 62  # 2**62 * any base is past every cap; beyond it float math overflows


class Jitter(Enum):
    FULL = "full"
    EQUAL = "equal"
    NONE = "none"


@dataclass(frozen=True, slots=True)
class Backoff:
    base_s: float
    max_s: float
    jitter: Jitter = Jitter.FULL

    def ceiling_s(self, retry: int) -> float:
        """The longest wait before retry number ``retry``."""
        doublings = min(max(retry - 1, 0), _MAX_DOUBLINGS)
        return float(min(self.max_s, self.base_s * 2.0**doublings))

    def delay_s(
        self,
        retry: int,
        *,
        retry_after_s: float | None = None,
        rand: Callable[[], float] = random.random,
    ) -> float:
        """Seconds to wait before retry number ``retry``; ``retry_after_s`` is the
        server's ``Retry-After`` when it sent one."""
        if retry_after_s is not None:
            return min(max(retry_after_s, 0.0), self.max_s)
        ceiling = self.ceiling_s(retry)
        if self.jitter is Jitter.FULL:
            return rand() * ceiling
        if self.jitter is Jitter.EQUAL:
            return ceiling * (0.5 + 0.5 * rand())
        return ceiling

    def delay_within_s(
        self,
        retry: int,
        remaining_s: float,
        *,
        retry_after_s: float | None = None,
        rand: Callable[[], float] = random.random,
    ) -> float | None:
        """``delay_s``, or None when waiting it would end more than ``remaining_s`` from
        now (the caller's deadline: give up rather than retry after it)."""
        delay = self.delay_s(retry, retry_after_s=retry_after_s, rand=rand)
        return delay if delay <= remaining_s else None


def parse_retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds the server asked us to wait, from ``retry-after-ms`` or ``retry-after``
    (delta seconds or an HTTP date); ``None`` when absent or unreadable."""
    lowered = {k.lower(): v for k, v in headers.items()}
    ms = lowered.get("retry-after-ms")
    if ms is not None:
        try:
            return max(float(ms) / 1000.0, 0.0)
        except ValueError:
            pass
    value = lowered.get("retry-after")
    if value is None:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    now = time.time() if now is None else now
    return max(when.timestamp() - now, 0.0)
