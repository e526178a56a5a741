"""The warm pool's sizing rules, with plain objects for items and a hand-driven clock."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable

import pytest

from workers.sandbox.pool import WarmPool


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Factory:
    def __init__(self, fail_first: int = 0) -> None:
        self.counter = itertools.count(1)
        self.destroyed: list[int] = []
        self.fail_first = fail_first
        self.lock = threading.Lock()

    def create(self) -> int:
        with self.lock:
            if self.fail_first > 0:
                self.fail_first -= 1
                raise RuntimeError("docker is down")
        return next(self.counter)

    def destroy(self, item: int) -> None:
        self.destroyed.append(item)


def eventually(check: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.01)


def make_pool(factory: Factory, clock: Clock, **kw: float) -> WarmPool[int]:
    args = {
        "min_size": 1,
        "max_size": 3,
        "idle_ttl_s": 10.0,
        "max_age_s": 100.0,
        "refill_quiet_s": 0.0,
        **kw,
    }
    return WarmPool(factory.create, factory.destroy, clock=clock, **args)  # type: ignore[arg-type]


def test_fills_to_min_size_and_counts_hits_and_misses() -> None:
    factory, clock = Factory(), Clock()
    pool = make_pool(factory, clock, min_size=2)
    assert pool.acquire() is None  # not started: a miss
    pool.start()
    try:
        assert pool.wait_ready(timeout_s=5)
        assert pool.acquire() is not None
        stats = pool.stats()
        assert (stats.hits, stats.misses) == (1, 1)
    finally:
        pool.close()


def test_a_miss_grows_the_target_and_quiet_shrinks_it_back() -> None:
    factory, clock = Factory(), Clock()
    pool = make_pool(factory, clock, min_size=1, max_size=3)
    pool.start()
    try:
        assert pool.wait_ready(timeout_s=5)
        assert pool.acquire() is not None
        pool.acquire()  # may hit or miss depending on the refill; then force misses
        while pool.acquire() is not None:
            pass
        eventually(lambda: pool.stats().idle == pool.stats().target)
        assert pool.stats().target > 1
        clock.now += 11  # quiet for longer than idle_ttl_s
        with pool._cond:
            pool._cond.notify_all()
        eventually(lambda: pool.stats().target == 1 and pool.stats().idle == 1)
    finally:
        pool.close()


def test_items_older_than_max_age_are_replaced_and_never_handed_out() -> None:
    factory, clock = Factory(), Clock()
    pool = make_pool(factory, clock, min_size=1, max_age_s=50)
    pool.start()
    try:
        assert pool.wait_ready(timeout_s=5)
        clock.now += 51
        # acquire never returns the stale item (1); the maintainer replaces it
        item = pool.acquire()
        assert item != 1
        assert 1 in factory.destroyed
    finally:
        pool.close()


def test_unhealthy_and_rejected_items() -> None:
    factory, clock = Factory(), Clock()
    dead: set[int] = set()
    pool = WarmPool(
        factory.create,
        factory.destroy,
        min_size=1,
        max_size=1,
        clock=clock,
        healthy=lambda i: i not in dead,
    )
    pool.start()
    try:
        assert pool.wait_ready(timeout_s=5)
        assert pool.acquire(accept=lambda i: False) is None  # rejected: stays in the pool
        assert pool.stats().idle == 1
        dead.add(1)
        assert pool.acquire() is None  # unhealthy: destroyed
        assert factory.destroyed == [1]
    finally:
        pool.close()


def test_create_failures_back_off_and_recover() -> None:
    factory, clock = Factory(fail_first=2), Clock()
    pool = make_pool(factory, clock, min_size=1)
    pool.start()
    try:
        assert pool.wait_ready(timeout_s=10)
        assert pool.stats().failures == 2
    finally:
        pool.close()


def test_close_destroys_idle_items() -> None:
    factory, clock = Factory(), Clock()
    pool = make_pool(factory, clock, min_size=2)
    pool.start()
    assert pool.wait_ready(timeout_s=5)
    pool.close()
    assert sorted(factory.destroyed) == [1, 2]
    assert pool.acquire() is None


def test_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError):
        WarmPool(lambda: 1, lambda i: None, min_size=3, max_size=2)


def test_refills_wait_for_a_lull_in_acquires_unless_one_missed() -> None:
    factory, clock = Factory(), Clock()
    pool = make_pool(factory, clock, min_size=3, refill_quiet_s=1.0)
    pool.start()
    try:
        assert pool.wait_ready(timeout_s=5)
        assert pool.acquire() is not None and pool.acquire() is not None  # a burst of hits
        time.sleep(0.2)
        assert pool.stats().idle == 1, "refilled in the middle of a burst"
        clock.now += 0.5
        assert pool.acquire() is not None  # the burst goes on: the lull starts again
        clock.now += 0.7  # 1.2 s since the burst began, 0.7 s since its last acquire
        time.sleep(0.2)
        assert pool.stats().idle == 0
        clock.now += 0.4  # a second without an acquire: now it refills
        eventually(lambda: pool.stats().idle == 3)

        for _ in range(3):
            assert pool.acquire() is not None
        assert pool.acquire() is None  # demand outran the pool: no waiting for a lull
        eventually(lambda: pool.stats().idle >= 3)
    finally:
        pool.close()


def test_two_creators_make_items_side_by_side() -> None:
    # Given a pool of two with two creators, whose create only returns once two creates are
    # running at the same time (one creator alone would wait out the barrier and fail)
    barrier = threading.Barrier(2, timeout=5)
    factory = Factory()

    def create() -> int:
        barrier.wait()
        return factory.create()

    pool = WarmPool(create, factory.destroy, min_size=2, max_size=2, refill_quiet_s=0.0, creators=2)
    # When it starts
    pool.start()
    try:
        # Then both items are made, at once
        assert pool.wait_ready(2, timeout_s=5)
        assert pool.stats().failures == 0
    finally:
        pool.close()
    # and closing stops both creators and destroys what was idle
    assert sorted(factory.destroyed) == [1, 2]
