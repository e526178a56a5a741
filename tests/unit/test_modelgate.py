"""A worker's side of the model gate, over an in-memory fleet store: shares between processes,
AIMD reports, lease lapses, bounded waits."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest
import redis

from tests.fakes import MemoryGateStore
from workers.gateplan import GateConfig
from workers.modelgate import GateTimeout, ModelGate, Outcome


def settle(gate: ModelGate, token: int, outcome: Outcome) -> None:
    """An exchange under the permit ended so, and the permit goes back."""
    gate.observe(token, outcome)
    gate.release()


def wait_for(check: Callable[[], object], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.005)


@pytest.fixture
def store() -> MemoryGateStore:
    return MemoryGateStore()


@pytest.fixture
def gates(store: MemoryGateStore) -> Iterator[Callable[..., ModelGate]]:
    made: list[ModelGate] = []

    def make(holder: str, cap: int = 16, **kw: object) -> ModelGate:
        config = GateConfig(cap, ttl_ms=int(kw.pop("ttl_ms", 10_000)))  # type: ignore[call-overload]
        gate = ModelGate(store, holder, config, server="test:1", **kw)  # type: ignore[arg-type]
        made.append(gate)
        return gate

    yield make
    for gate in made:
        gate.close()


def soon() -> float:
    return time.monotonic() + 0.05


def test_a_process_alone_gets_the_whole_cap_and_no_more(gates: Callable[..., ModelGate]) -> None:
    a = gates("a")
    a.sync()
    tokens = [a.acquire(soon()) for _ in range(16)]
    with pytest.raises(GateTimeout):
        a.acquire(soon())
    for t in tokens:
        settle(a, t, Outcome.OK)


def test_a_hog_gives_back_down_to_its_share_and_the_other_gets_it(
    gates: Callable[..., ModelGate], store: MemoryGateStore
) -> None:
    # given process a holding all 16 slots
    a, b = gates("a"), gates("b")
    a.sync()
    held = [a.acquire(soon()) for _ in range(16)]
    # and 10 requests of process b waiting
    got: list[int] = []
    waiters = [
        threading.Thread(target=lambda: got.append(b.acquire(time.monotonic() + 30)))
        for _ in range(10)
    ]
    for w in waiters:
        w.start()
    wait_for(lambda: b.permits.usage().waiting == 10)
    assert b.sync().permits == 0  # nothing free yet
    # when a syncs, it learns its share is 8 of 16 and takes no new slot while above it
    assert a.sync().permits == 8
    with pytest.raises(GateTimeout):
        a.acquire(soon())
    # then as a's requests finish and it syncs, 8 of b's waiting requests get a slot
    for t in held[8:]:
        settle(a, t, Outcome.OK)
    a.sync()
    assert b.sync().permits == 8
    wait_for(lambda: len(got) == 8)
    assert b.permits.usage().waiting == 2
    assert store.state is not None
    assert sum(h.held for h in store.state.holders.values()) == 16
    # and when a is done, b's last two get theirs too
    for t in held[:8]:
        settle(a, t, Outcome.OK)
    a.sync()
    b.sync()
    for w in waiters:
        w.join(10)
    assert len(got) == 10


def test_the_fleet_never_has_more_than_the_cap_in_flight_and_both_processes_progress(
    gates: Callable[..., ModelGate],
) -> None:
    # given two processes of 12 threads each, syncing on their own threads, cap 8
    a = gates("a", cap=8, tick_s=0.05, fast_tick_s=0.01)
    b = gates("b", cap=8, tick_s=0.05, fast_tick_s=0.01)
    a.start()
    b.start()
    lock = threading.Lock()
    in_flight, peak = 0, 0
    done = {"a": 0, "b": 0}
    stop = time.monotonic() + 1.5

    def loop(gate: ModelGate) -> None:
        nonlocal in_flight, peak
        while time.monotonic() < stop:
            try:
                token = gate.acquire(time.monotonic() + 5)
            except GateTimeout:
                continue
            with lock:
                in_flight += 1
                peak = max(peak, in_flight)
            time.sleep(0.01)  # the model's latency
            with lock:
                in_flight -= 1
                done[gate.holder] += 1
            settle(gate, token, Outcome.OK)

    threads = [threading.Thread(target=loop, args=(g,)) for g in (a, b) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert peak <= 8
    # both shared the server: neither got less than a third of the work done
    total = done["a"] + done["b"]
    assert min(done.values()) > total / 3, done


def test_an_overload_makes_the_gate_sync_at_once_and_lowers_the_limit_fleet_wide(
    gates: Callable[..., ModelGate], store: MemoryGateStore
) -> None:
    # given ticks so slow that only a wake-up can make a sync happen during the test
    a = gates("a", tick_s=60, fast_tick_s=60)
    b = gates("b", tick_s=60, fast_tick_s=60)
    a.start()
    b.sync()
    tokens = [a.acquire(soon()) for _ in range(8)]
    syncs = store.syncs
    # when a request comes back 429
    settle(a, tokens.pop(), Outcome.THROTTLED)
    # then the gate reports it promptly and the fleet's limit falls from what was in flight
    wait_for(lambda: store.syncs > syncs)
    assert store.state is not None and store.state.epoch == 1
    assert store.state.limit == pytest.approx(0.9 * 7)
    # and the other process's grant follows at its next sync
    assert b.sync().limit == pytest.approx(0.9 * 7)
    # a second 429 of a request sent under the old limit does not lower it again
    settle(a, tokens.pop(), Outcome.THROTTLED)
    wait_for(lambda: store.syncs > syncs + 2)
    assert store.state.epoch == 1
    for t in tokens:
        settle(a, t, Outcome.OK)


def test_successes_raise_the_limit_back_towards_the_cap(
    gates: Callable[..., ModelGate], store: MemoryGateStore
) -> None:
    a = gates("a")
    a.sync()
    settle(a, a.acquire(soon()), Outcome.TIMEOUT)
    low = a.sync().limit
    assert low < 16
    for _ in range(40):
        settle(a, a.acquire(soon()), Outcome.OK)
    assert a.sync().limit > low + 2
    # failures that say nothing about load move nothing
    before = a.sync().limit
    settle(a, a.acquire(soon()), Outcome.FAILED)
    assert a.sync().limit == before


def test_a_process_that_cannot_reach_the_fleet_stops_using_its_permits_after_the_lease(
    gates: Callable[..., ModelGate], store: MemoryGateStore
) -> None:
    a = gates("a", ttl_ms=300, tick_s=0.02, fast_tick_s=0.02)
    a.start()
    assert a.permits.usage().granted == 16
    # when Redis goes away, the permits last until the lease would have ended, not beyond
    store.failing = redis.ConnectionError("gone")
    wait_for(lambda: a.permits.usage().granted == 0, timeout_s=5)
    with pytest.raises(GateTimeout):
        a.acquire(soon())
    # and come back with the store
    store.failing = None
    wait_for(lambda: a.permits.usage().granted == 16, timeout_s=5)
    settle(a, a.acquire(soon()), Outcome.OK)


def test_a_failed_sync_keeps_what_it_had_to_report(
    gates: Callable[..., ModelGate], store: MemoryGateStore
) -> None:
    a = gates("a")
    a.sync()
    settle(a, a.acquire(soon()), Outcome.THROTTLED)
    store.failing = redis.ConnectionError("blip")
    with pytest.raises(redis.ConnectionError):
        a.sync()
    store.failing = None
    # the overload seen before the blip still lowers the limit
    assert a.sync().epoch == 1


def test_close_gives_the_permits_back_to_the_fleet(
    gates: Callable[..., ModelGate], store: MemoryGateStore
) -> None:
    a, b = gates("a"), gates("b")
    a.sync()
    assert b.sync().permits == 0
    a.close()
    assert store.left == ["a"]
    assert b.sync().permits == 16
