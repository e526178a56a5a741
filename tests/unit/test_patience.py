"""``store.patience``: a Redis call retried through an outage by the one backoff rule, for
at most its patience."""

from __future__ import annotations

import pytest
import redis

from store.patience import patiently


class Outage:
    """Redis away for the first ``failures`` calls; a clock that only sleeping moves."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0
        self.now = 0.0
        self.slept: list[float] = []

    def op(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise redis.ConnectionError("Connection refused")
        return "OK"

    def sleep(self, s: float) -> None:
        self.slept.append(s)
        self.now += s


def test_a_call_rides_out_a_short_outage_waiting_longer_each_time() -> None:
    o = Outage(failures=6)
    assert patiently(o.op, 120.0, sleep=o.sleep, clock=lambda: o.now) == "OK"
    assert o.slept == pytest.approx([0.2, 0.4, 0.8, 1.6, 3.0, 3.0])


def test_a_call_that_answers_at_once_never_waits() -> None:
    o = Outage(failures=0)
    assert patiently(o.op, 120.0, sleep=o.sleep, clock=lambda: o.now) == "OK"
    assert o.slept == [] and o.calls == 1


def test_an_outage_longer_than_the_patience_raises_the_last_error_in_time() -> None:
    o = Outage(failures=10**6)
    with pytest.raises(redis.ConnectionError):
        patiently(o.op, 10.0, sleep=o.sleep, clock=lambda: o.now)
    assert sum(o.slept) <= 10.0  # never waits past the patience
    assert sum(o.slept) > 10.0 - 3.0  # and gives up only when the next wait would pass it


def test_other_errors_are_not_retried() -> None:
    def op() -> str:
        raise redis.ResponseError("WRONGTYPE")

    with pytest.raises(redis.ResponseError):
        patiently(op, 10.0, sleep=lambda s: pytest.fail("must not wait"))
