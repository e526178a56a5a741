"""The launch gate: a task's launch never waits behind the pool's refills."""

from __future__ import annotations

import threading
import time

import pytest

from workers.sandbox.launch import LaunchGate


def _waiter(gate: LaunchGate, urgent: bool, got: list[str], name: str) -> threading.Thread:
    def run() -> None:
        gate.acquire(urgent=urgent)
        got.append(name)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _until_waiting(gate: LaunchGate, urgent: int, background: int) -> None:
    deadline = time.monotonic() + 5
    while gate.waiting() != (urgent, background):
        assert time.monotonic() < deadline, gate.waiting()
        time.sleep(0.001)


def test_a_released_slot_goes_to_a_waiting_task_before_an_earlier_refill() -> None:
    gate = LaunchGate(1)
    gate.acquire(urgent=False)  # a refill holds the only slot
    got: list[str] = []
    refill = _waiter(gate, False, got, "refill")
    _until_waiting(gate, 0, 1)
    task = _waiter(gate, True, got, "task")
    _until_waiting(gate, 1, 1)

    gate.release()
    task.join(5)
    assert got == ["task"]  # the refill came first but waits on
    assert gate.waiting() == (0, 1)

    gate.release()
    refill.join(5)
    assert got == ["task", "refill"]


def test_a_refill_that_releases_cannot_take_the_slot_back_past_a_waiter() -> None:
    """The starvation a plain semaphore allowed: the releasing refill thread re-acquiring
    at once, before the woken task ran."""
    gate = LaunchGate(1)
    gate.acquire(urgent=False)
    got: list[str] = []
    task = _waiter(gate, True, got, "task")
    _until_waiting(gate, 1, 0)

    gate.release()
    again = _waiter(gate, False, got, "refill again")  # it must queue, not barge
    task.join(5)
    _until_waiting(gate, 0, 1)
    assert got == ["task"]
    gate.release()
    again.join(5)
    assert got == ["task", "refill again"]


def test_waiters_of_one_kind_are_served_in_order_and_slots_bound_holders() -> None:
    gate = LaunchGate(2)
    gate.acquire(urgent=True)
    gate.acquire(urgent=False)
    got: list[str] = []
    threads = []
    for i in range(3):
        threads.append(_waiter(gate, True, got, f"t{i}"))
        _until_waiting(gate, i + 1, 0)
    for i in range(3):
        gate.release()
        threads[i].join(5)
        assert got == [f"t{k}" for k in range(i + 1)]
    # two slots held (by t1 and t2 now): a newcomer waits
    assert gate.waiting() == (0, 0)
    late = _waiter(gate, False, got, "late")
    _until_waiting(gate, 0, 1)
    gate.release()
    late.join(5)
    assert got[-1] == "late"


def test_free_slots_are_taken_without_waiting_and_bad_sizes_refused() -> None:
    gate = LaunchGate(2)
    with gate.slot(urgent=False), gate.slot(urgent=True):
        assert gate.waiting() == (0, 0)
    with gate.slot(urgent=False), gate.slot(urgent=False):
        pass  # both came back
    with pytest.raises(ValueError, match="at least one"):
        LaunchGate(0)
