"""The LLM adapter's retry delays: full-jitter exponential backoff, or the server's word."""

from __future__ import annotations

import pytest

from workers.llm import compute_backoff, parse_retry_after


def test_full_jitter_is_uniform_below_an_exponential_ceiling() -> None:
    # given the random draw at its top, the delay is the ceiling: base * 2**(retry-1)
    delays = [compute_backoff(r, base_s=0.5, max_s=100.0, rand=lambda: 1.0) for r in (1, 2, 3, 4)]
    assert delays == [0.5, 1.0, 2.0, 4.0]
    # and a draw of 0.25 gives a quarter of it
    assert compute_backoff(3, base_s=0.5, max_s=100.0, rand=lambda: 0.25) == 0.5


def test_ceiling_is_capped_at_max_s_even_for_huge_retry_counts() -> None:
    assert compute_backoff(10, base_s=0.5, max_s=30.0, rand=lambda: 1.0) == 30.0
    assert compute_backoff(10_000, base_s=0.5, max_s=30.0, rand=lambda: 1.0) == 30.0


def test_zero_draw_means_no_wait() -> None:
    assert compute_backoff(5, rand=lambda: 0.0) == 0.0


def test_real_jitter_stays_in_range() -> None:
    delays = [compute_backoff(3, base_s=1.0, max_s=30.0) for _ in range(500)]
    assert all(0.0 <= d <= 4.0 for d in delays)
    assert len(set(delays)) > 100  # jittered, not a constant


def test_retry_after_wins_over_jitter_but_is_clamped() -> None:
    assert compute_backoff(1, retry_after_s=7.0, max_s=30.0, rand=lambda: 0.0) == 7.0
    assert compute_backoff(1, retry_after_s=120.0, max_s=30.0) == 30.0
    assert compute_backoff(1, retry_after_s=-3.0) == 0.0


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, None),
        ({"Retry-After": "3"}, 3.0),
        ({"retry-after": "1.5"}, 1.5),
        ({"retry-after-ms": "250"}, 0.25),
        ({"retry-after-ms": "250", "retry-after": "9"}, 0.25),  # the finer one first
        ({"retry-after-ms": "soon", "retry-after": "9"}, 9.0),
        ({"Retry-After": "-4"}, 0.0),
        ({"Retry-After": "whenever"}, None),
    ],
)
def test_parse_retry_after(headers: dict[str, str], expected: float | None) -> None:
    assert parse_retry_after(headers) == expected


def test_parse_retry_after_http_date() -> None:
    # given "now" is 2015-10-21 07:28:00 GMT and the server says 07:28:10
    now = 1445412480.0
    assert parse_retry_after({"Retry-After": "Wed, 21 Oct 2015 07:28:10 GMT"}, now=now) == 10.0
    # a date in the past means "now"
    assert parse_retry_after({"Retry-After": "Wed, 21 Oct 2015 07:27:00 GMT"}, now=now) == 0.0
