"""The model gate on a real redis-server: slots shared between processes, a killed holder's
slots coming back, the compare-and-set under contention."""

from __future__ import annotations

import random
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from store.keys import Keys
from workers.gateplan import FleetState, GateConfig, Report, plan
from workers.gatestore import RedisGateStore, server_id, server_label
from workers.modelgate import GateTimeout, ModelGate, Outcome


def settle(gate: ModelGate, token: int, outcome: Outcome) -> None:
    """An exchange under the permit ended so, and the permit goes back."""
    gate.observe(token, outcome)
    gate.release()


SERVER = server_id("http://127.0.0.1:9/v1")

# A worker process's use of the gate: `threads` loops that take a slot, count themselves in
# the fleet-wide `inflight` key (recording its peak in `peak`), hold the slot for `hold_s`,
# and give it back; or, with `hog`, take every slot it can and hold them until killed.
HOLDER = textwrap.dedent(
    """
    import sys, threading, time
    import redis
    from store.keys import Keys
    from workers.gateplan import GateConfig
    from workers.gatestore import RedisGateStore
    from workers.modelgate import GateTimeout, ModelGate, Outcome

    url, server, holder, cap, ttl_ms, threads, hold_s, run_s, hog = sys.argv[1:]
    r = redis.Redis.from_url(url)
    store = RedisGateStore(r, Keys("t"), server)
    gate = ModelGate(store, holder, GateConfig(int(cap), ttl_ms=int(ttl_ms)), server="t",
                     tick_s=0.2, fast_tick_s=0.05)
    gate.start()
    peak = r.register_script(
        "local n = redis.call('INCR', KEYS[1]) "
        "if n > tonumber(redis.call('GET', KEYS[2]) or '0') then redis.call('SET', KEYS[2], n) end "
        "return n")
    if hog == "1":
        got = 0
        while got < int(cap):
            try:
                gate.acquire(time.monotonic() + 0.5)
                got += 1
            except GateTimeout:
                break
        print(got, flush=True)
        time.sleep(3600)
    stop = time.monotonic() + float(run_s)
    done = 0
    def loop():
        global done
        while time.monotonic() < stop:
            try:
                token = gate.acquire(time.monotonic() + 5)
            except GateTimeout:
                continue
            peak(keys=["inflight", "peak"])
            time.sleep(float(hold_s))
            r.decr("inflight")
            gate.observe(token, Outcome.OK)
            gate.release()
            done += 1
    ts = [threading.Thread(target=loop) for _ in range(int(threads))]
    for t in ts: t.start()
    for t in ts: t.join()
    gate.close()
    print(done, flush=True)
    """
)


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def holder_process(
    redis_url: str, holder: str, *, cap: int, ttl_ms: int = 10_000, threads: int = 1,
    hold_s: float = 0.01, run_s: float = 0.0, hog: bool = False,
) -> subprocess.Popen[str]:  # fmt: skip
    args = [redis_url, SERVER, holder, cap, ttl_ms, threads, hold_s, run_s, int(hog)]
    return subprocess.Popen(
        [sys.executable, "-c", HOLDER, *map(str, args)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )


def test_two_processes_share_the_cap_and_never_exceed_it(redis_url: str, r: redis.Redis) -> None:
    # given two worker processes of 10 loops each under one cap of 6 slots
    procs = [
        holder_process(redis_url, f"w{i}", cap=6, threads=10, hold_s=0.02, run_s=4.0)
        for i in range(2)
    ]
    done = [int(p.communicate(timeout=60)[0].strip()) for p in procs]
    # then the fleet never had more than 6 requests in flight, and both got work done
    assert int(r.get("peak") or 0) <= 6
    assert int(r.get("peak") or 0) >= 4  # and the slots were used, not left idle
    assert min(done) > sum(done) / 4, done
    # and the processes gave their slots back when they closed
    state = RedisGateStore(r, Keys("t"), SERVER).state(6)
    assert state.holders == {}


def test_a_killed_holders_slots_come_back_within_the_lease(redis_url: str, r: redis.Redis) -> None:
    # given a worker process that took every slot and was then killed -9
    hog = holder_process(redis_url, "hog", cap=4, ttl_ms=1500, hog=True)
    assert hog.stdout is not None
    assert hog.stdout.readline().strip() == "4"
    gate = ModelGate(
        RedisGateStore(r, Keys("t"), SERVER),
        "survivor",
        GateConfig(4, ttl_ms=1500),
        server="t",
        tick_s=0.1,
        fast_tick_s=0.05,
    )
    gate.start()
    try:
        with pytest.raises(GateTimeout):  # the hog's lease is alive: no slot
            gate.acquire(time.monotonic() + 0.3)
        hog.kill()
        hog.wait(10)
        killed = time.monotonic()
        # then within the lease TTL (plus a sync) its slots are the survivor's
        tokens = [gate.acquire(killed + 10) for _ in range(4)]
        assert time.monotonic() - killed < 1.5 + 4.0  # the TTL, and a loaded machine's lag
        for t in tokens:
            settle(gate, t, Outcome.OK)
    finally:
        gate.close()
        if hog.poll() is None:
            hog.kill()


def test_concurrent_syncs_of_many_holders_keep_the_total_within_the_limit(r: redis.Redis) -> None:
    store = RedisGateStore(r, Keys("t"), SERVER)
    config = GateConfig(10)
    errors: list[BaseException] = []
    grants: dict[str, int] = {}

    def holder(name: str) -> None:
        try:
            for i in range(30):
                in_use = min(grants.get(name, 0), i % 5)
                grants[name] = store.sync(name, Report(want=8, in_use=in_use), config).permits
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=holder, args=(f"h{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    state = store.state(10)
    assert set(state.holders) == {f"h{i}" for i in range(6)}
    assert sum(h.held for h in state.holders.values()) <= 10


def test_the_state_survives_a_round_trip_through_redis(r: redis.Redis) -> None:
    store = RedisGateStore(r, Keys("t"), SERVER)
    config = GateConfig(8)
    store.sync("a", Report(want=3, in_use=0), config)
    store.sync("a", Report(want=3, in_use=2, overload_epoch=0), config)
    state = store.state(8)
    assert state.epoch == 1 and state.limit == pytest.approx(0.9 * 2)
    assert state.holders["a"].in_use == 2 and state.holders["a"].want == 3
    # the key is in one cluster slot (a hash tag) and expires when nobody syncs any more
    assert store.key == "t:gate:{" + SERVER + "}"
    assert 0 < r.pttl(store.key) <= 24 * 3600 * 1000


@pytest.mark.parametrize("seed", range(6))
def test_the_redis_script_follows_the_python_rules_on_random_histories(
    r: redis.Redis, seed: int
) -> None:
    # given random syncs of holders (odd names included), overloads, successes, deaths
    rng = random.Random(seed)
    config = GateConfig(cap=rng.choice([1, 7, 16, 64]), ttl_ms=5_000, decrease=0.7)
    names = ["w-1", "W_2", "host.a-99-ff", "été", "a"][: rng.randint(1, 5)]
    store = RedisGateStore(r, Keys(f"diff{seed}"), SERVER)
    state = FleetState(float(config.cap))
    now = 1_700_000_000_000
    for _ in range(300):
        now += rng.choice([0, 1, 50, 800, 6_000])
        holder = rng.choice(names)
        in_use = rng.randint(0, 20)
        report = Report(
            want=in_use + rng.randint(0, 20),
            in_use=in_use,
            successes=rng.choice([0, 0, 1, 5, 40]),
            overload_epoch=rng.choice([None, None, state.epoch, state.epoch - 1]),
        )
        state, expected = plan(state, holder, report, now, config)
        # then Redis grants the same and stores the same state
        assert store.sync(holder, report, config, now_ms=now) == expected
        assert store.state(config.cap) == state


def test_server_ids_name_a_base_url_not_its_spelling() -> None:
    same: list[Callable[[], str]] = [
        lambda: server_id("http://127.0.0.1:8000/v1"),
        lambda: server_id("http://127.0.0.1:8000/v1/"),
        lambda: server_id("HTTP://user:secret@127.0.0.1:8000/v1"),
    ]
    assert len({f() for f in same}) == 1
    assert server_id("http://127.0.0.1:8001/v1") != server_id("http://127.0.0.1:8000/v1")
    assert server_id("https://models.internal/v1") == server_id("https://models.internal:443/v1")
    assert server_label("http://user:secret@127.0.0.1:8000/v1") == "127.0.0.1:8000"
