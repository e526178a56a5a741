"""The LLM adapter's reading of the server's word on when to retry (``Retry-After``); the
delay rule itself is ``agent.backoff``'s (tests/unit/test_backoff.py)."""

from __future__ import annotations

import pytest

from agent.backoff import parse_retry_after


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
