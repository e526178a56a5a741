"""Fixtures of the store tests: a clock the test moves, and a worker store on the session's
redis-server that reads it."""

from __future__ import annotations

import time

import pytest
import redis

from store.keys import Keys
from store.worker_store import WorkerStore


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(redis_url: str, clock: Clock) -> WorkerStore:
    return WorkerStore(redis.Redis.from_url(redis_url), Keys("t"), lease_ttl_s=30, clock=clock)
