"""The one backoff rule (``agent.backoff``): an exponential ceiling, its jitter, the
server's ``Retry-After``, and the caller's deadline."""

from __future__ import annotations

import random

import pytest

from agent.backoff import Backoff, Jitter

TOP = 1.0 - 1e-12  # the largest draw ``random.random`` can give, near enough


def test_the_ceiling_doubles_from_base_up_to_the_cap() -> None:
    b = Backoff(0.5, 3.0)
    assert [b.ceiling_s(n) for n in (1, 2, 3, 4, 5)] == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_the_cap_holds_for_huge_retry_counts_and_retry_zero_is_the_first() -> None:
    b = Backoff(0.5, 30.0)
    assert b.ceiling_s(10_000) == 30.0
    assert b.ceiling_s(0) == b.ceiling_s(1) == 0.5


def test_full_jitter_is_uniform_between_zero_and_the_ceiling() -> None:
    b = Backoff(0.5, 100.0, Jitter.FULL)
    assert [b.delay_s(n, rand=lambda: 1.0) for n in (1, 2, 3, 4)] == [0.5, 1.0, 2.0, 4.0]
    assert b.delay_s(3, rand=lambda: 0.25) == 0.5
    assert b.delay_s(5, rand=lambda: 0.0) == 0.0


def test_real_full_jitter_stays_within_its_bounds_and_spreads() -> None:
    b = Backoff(1.0, 30.0, Jitter.FULL)
    rng = random.Random(7)
    delays = [b.delay_s(3, rand=rng.random) for _ in range(500)]
    assert all(0.0 <= d <= 4.0 for d in delays)
    assert len(set(delays)) > 100  # jittered, not a constant
    assert min(delays) < 0.5 and max(delays) > 3.5  # the whole range is used


def test_equal_jitter_is_between_half_the_ceiling_and_the_ceiling() -> None:
    b = Backoff(5.0, 3600.0, Jitter.EQUAL)
    assert [b.delay_s(n, rand=lambda: 0.0) for n in (1, 2, 3, 4)] == [2.5, 5, 10, 20]
    assert [b.delay_s(n, rand=lambda: TOP) for n in (1, 2, 3)] == pytest.approx([5, 10, 20])
    assert b.delay_s(30, rand=lambda: TOP) == pytest.approx(3600)


def test_no_jitter_is_the_ceiling_and_draws_nothing() -> None:
    def no_draw() -> float:
        raise AssertionError("Jitter.NONE must not draw")

    b = Backoff(2.0, 60.0, Jitter.NONE)
    assert [b.delay_s(n, rand=no_draw) for n in (1, 2, 3, 6, 7)] == [2, 4, 8, 60, 60]


@pytest.mark.parametrize("jitter", list(Jitter))
def test_retry_after_wins_over_every_jitter_but_is_clamped_to_the_cap(jitter: Jitter) -> None:
    b = Backoff(0.5, 30.0, jitter)
    assert b.delay_s(1, retry_after_s=7.0, rand=lambda: 0.0) == 7.0
    assert b.delay_s(9, retry_after_s=0.1, rand=lambda: TOP) == 0.1  # less than the draw
    assert b.delay_s(1, retry_after_s=120.0) == 30.0
    assert b.delay_s(1, retry_after_s=-3.0) == 0.0


def test_a_wait_that_would_end_past_the_deadline_is_none() -> None:
    b = Backoff(5.0, 60.0, Jitter.EQUAL)
    assert b.delay_within_s(1, 9.0, rand=lambda: 0.0) == 2.5
    assert b.delay_within_s(3, 9.0, rand=lambda: 0.0) is None  # 10 s > 9 s left
    assert b.delay_within_s(2, 5.0, rand=lambda: 0.0) == 5.0  # ending at the deadline is fine
    assert b.delay_within_s(1, -1.0, rand=lambda: 0.0) is None  # already past it


def test_the_deadline_applies_to_retry_after_too() -> None:
    b = Backoff(0.5, 30.0)
    assert b.delay_within_s(1, 10.0, retry_after_s=20.0) is None
    assert b.delay_within_s(1, 10.0, retry_after_s=4.0) == 4.0
