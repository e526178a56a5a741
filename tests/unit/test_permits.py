"""A worker's model-server permits: counted, handed out first come first served, bounded waits."""

from __future__ import annotations

import threading
import time

import pytest

from workers.permits import Permits, Usage


def wait_for(check: object, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.005)


def test_permits_within_the_grant_are_taken_at_once_and_counted() -> None:
    permits = Permits()
    permits.set_granted(2)
    assert permits.acquire(None) and permits.acquire(None)
    assert permits.usage() == Usage(granted=2, in_use=2, waiting=0)
    permits.release()
    assert permits.usage() == Usage(granted=2, in_use=1, waiting=0)


def test_beyond_the_grant_a_caller_waits_until_its_deadline_and_is_told_so() -> None:
    starved: list[bool] = []
    permits = Permits(on_starved=lambda: starved.append(True))
    permits.set_granted(1)
    assert permits.acquire(None)
    started = time.monotonic()

    assert permits.acquire(time.monotonic() + 0.2) is False

    assert time.monotonic() - started >= 0.2  # never gives up before the deadline
    assert starved == [True]  # the gate was asked for more
    assert permits.usage() == Usage(granted=1, in_use=1, waiting=0)  # no waiter left behind


def test_a_deadline_already_past_fails_without_waiting() -> None:
    permits = Permits()
    assert permits.acquire(time.monotonic() - 1) is False
    assert permits.usage().waiting == 0


def test_a_released_permit_goes_to_the_oldest_waiter_not_to_a_newcomer() -> None:
    permits = Permits()
    permits.set_granted(1)
    assert permits.acquire(None)
    order: list[int] = []

    def take(n: int) -> None:
        assert permits.acquire(time.monotonic() + 30)
        order.append(n)
        permits.release()

    threads = []
    for n in range(5):
        t = threading.Thread(target=take, args=(n,))
        t.start()
        threads.append(t)
        wait_for(lambda n=n: permits.usage().waiting == n + 1)
    # when the holder releases while a newcomer is grabbing, the queue keeps its order
    permits.release()
    assert permits.acquire(time.monotonic() + 30)
    order.append(-1)  # the newcomer
    for t in threads:
        t.join(10)
    assert order == [0, 1, 2, 3, 4, -1]
    permits.release()


def test_a_bigger_grant_wakes_as_many_waiters_as_it_allows() -> None:
    permits = Permits()
    got: list[int] = []
    threads = [
        threading.Thread(target=lambda: got.append(int(permits.acquire(time.monotonic() + 30))))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    wait_for(lambda: permits.usage().waiting == 3)

    permits.set_granted(2)

    wait_for(lambda: len(got) == 2)
    assert permits.usage() == Usage(granted=2, in_use=2, waiting=1)
    permits.set_granted(3)
    for t in threads:
        t.join(10)
    assert got == [1, 1, 1]


def test_a_smaller_grant_holds_new_requests_until_enough_come_back() -> None:
    permits = Permits()
    permits.set_granted(3)
    for _ in range(3):
        assert permits.acquire(None)
    # the fleet lowers this process's grant below what it has in flight
    permits.set_granted(1)
    assert permits.acquire(time.monotonic() + 0.05) is False
    permits.release()
    assert permits.acquire(time.monotonic() + 0.05) is False  # 2 in use, 1 granted
    permits.release()
    permits.release()
    assert permits.acquire(time.monotonic() + 0.05) is True


def test_many_threads_never_hold_more_than_granted() -> None:
    permits = Permits()
    permits.set_granted(4)
    peak = 0
    holding = 0
    lock = threading.Lock()

    def work() -> None:
        nonlocal peak, holding
        for _ in range(50):
            assert permits.acquire(time.monotonic() + 30)
            with lock:
                holding += 1
                peak = max(peak, holding)
            time.sleep(0.0005)
            with lock:
                holding -= 1
            permits.release()

    threads = [threading.Thread(target=work) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert peak == 4
    assert permits.usage() == Usage(granted=4, in_use=0, waiting=0)


def test_releasing_more_than_taken_is_a_bug_and_says_so() -> None:
    with pytest.raises(RuntimeError):
        Permits().release()
