"""The standing chaos suite: Redis outages longer than every reconnect window, lost broker
messages, workers killed, stopped and restarted mid-batch. After each, every task ends
exactly once (one ``task.finished``, no step twice), and the workers and the API recover
by themselves. Real processes throughout (``tests/e2e/fleet.py``).
"""

from __future__ import annotations

import base64
import json
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from agent.events import EventType
from agent.models import Status
from store import keys
from store.batches import sum_counters, tally
from tests.conftest import RedisServer
from tests.e2e.fleet import Fleet, assert_each_ran_exactly_once, wait_for

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.bwrap,
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="needs bubblewrap"),
]


@pytest.fixture
def fleet(redis_server: RedisServer, tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(redis_server, tmp_path)
    yield f
    f.close()


def test_after_an_outage_that_outlasts_their_tasks_workers_consume_again_or_say_they_cannot(
    fleet: Fleet,
) -> None:
    # given three workers with every slot busy, whose store gives up on Redis after 3 s:
    # ours, and two whose consumer dies when its tasks end while Redis is down (kombu's
    # own ack bookkeeping), one told to stay up, one to exit on a dead consumer (the default)
    ours = fleet.start_worker(concurrency=2, **_STALL_ENV)
    stay = fleet.start_worker(
        concurrency=2, kombu_qos=True, ACTFLEET_WORKER_EXIT_ON_STALL="false", **_STALL_ENV
    )
    leave = fleet.start_worker(concurrency=2, kombu_qos=True, **_STALL_ENV)
    for worker in (ours, stay, leave):
        fleet.wait_healthy(worker)
    ids = fleet.submit(30)  # enough that messages still wait when Redis is back
    for worker in (ours, stay, leave):
        fleet.wait_mid_task(worker.pid, n=2)

    # when Redis dies for longer than that patience, so every running task ends (its
    # acknowledgement failing, the broker being gone) during the outage, and comes back
    fleet.server.kill()
    time.sleep(12)
    fleet.server.start()

    # then the dead consumers are noticed: messages wait, slots are free, nothing taken;
    # the status key and /healthz say so, and the one allowed to exits with status 3
    assert leave.wait(timeout=120) == 3
    wait_for(lambda: fleet.health(stay).status_code == 503, 60)
    assert fleet.health(stay).json()["consumer"] == "stalled"
    assert "consumer.stalled" in fleet.logs()
    # and our worker's consumer takes messages again: every task finishes exactly once
    fleet.wait_all_terminal(ids, timeout_s=180)
    assert_each_ran_exactly_once(fleet, ids)
    assert ours.poll() is None
    assert fleet.health(ours).json()["consumer"] == "ok"
    keys_ = fleet.store.r.keys("af:worker:*")
    statuses = sorted(json.loads(v)["consumer"] for v in fleet.store.r.mget(keys_))
    assert statuses == ["ok", "stalled"]


_STALL_ENV = {"ACTFLEET_REDIS_PATIENCE_S": "3", "ACTFLEET_WORKER_CONSUMER_STALL_S": "10"}


def test_a_task_whose_broker_message_was_lost_is_enqueued_again_and_runs_once(
    fleet: Fleet,
) -> None:
    # given three tasks accepted by the API while no worker runs
    fleet.start_api()
    with fleet.api_client() as api:
        ids = []
        for i in range(3):
            resp = api.post(
                "/v1/tasks", json={"prompt": f"count #{i}", "expected": {"answer": "3"}}
            )
            assert resp.status_code == 202, resp.text
            ids.append(resp.json()["id"])

    # when one task's message vanishes from the queue (a crash, a flush, a stray LREM)
    lost = ids[1]
    for raw in fleet.store.r.lrange(keys.TASK_QUEUE, 0, -1):
        args, _kwargs, _embed = json.loads(base64.b64decode(json.loads(raw)["body"]))
        if args == [lost]:
            assert fleet.store.r.lrem(keys.TASK_QUEUE, 1, raw) == 1
    assert fleet.queue_depth() == 2
    # and a worker starts
    fleet.start_worker(concurrency=4, ACTFLEET_QUEUED_GRACE_S="5")

    # then the lost one is given a new message after the grace, and each task runs once
    fleet.wait_all_terminal(ids, timeout_s=120)
    assert_each_ran_exactly_once(fleet, ids)
    assert "message_lost" in fleet.logs()


def started_by(fleet: Fleet, task_id: str) -> list[tuple[float, str]]:
    """(when, worker id) of each task.started event of the task."""
    return [
        (e.ts, str(e.data["worker"]))
        for e in fleet.store.events(task_id)
        if e.type is EventType.STARTED
    ]


def test_sigterm_lets_a_worker_finish_what_it_runs_take_nothing_new_and_exit_0(
    fleet: Fleet,
) -> None:
    # given a worker in the middle of two tasks, with four more waiting
    worker = fleet.start_worker(concurrency=2, ACTFLEET_WORKER_SHUTDOWN_GRACE_S="60")
    ids = fleet.submit(6)
    running = fleet.wait_mid_task(worker.pid, n=2)

    # when it gets SIGTERM
    signalled = time.time()
    assert fleet.sigterm(worker) == 0

    # then it finished the two it ran (as their first and only attempt) and took no other
    for task_id in running:
        rec = fleet.store.get(task_id)
        assert rec is not None and rec.status is Status.COMPLETED
        assert rec.attempt == 1
    mine = f"-{worker.pid}-"
    late = [t for t in ids for ts, w in started_by(fleet, t) if mine in w and ts > signalled]
    assert late == []
    assert fleet.queue_depth() == 4
    # and the rest wait for the next worker, which runs each once
    fleet.start_worker(concurrency=4)
    fleet.wait_all_terminal(ids, timeout_s=120)
    assert_each_ran_exactly_once(fleet, ids)


def test_sigterm_hands_back_what_does_not_finish_within_the_grace(fleet: Fleet) -> None:
    # given a worker in the middle of two long tasks, a 1 s grace and no attempt to spare
    env = {"ACTFLEET_WORKER_SHUTDOWN_GRACE_S": "1", "ACTFLEET_MAX_ATTEMPTS": "1"}
    worker = fleet.start_worker(concurrency=2, **env)
    ids = fleet.submit(2, prompt="slow")
    running = fleet.wait_mid_task(worker.pid, n=2)

    # when it gets SIGTERM, it exits 0 soon, without waiting for the tasks
    assert fleet.sigterm(worker, timeout_s=60) == 0

    # then both went back to the queue at their checkpoint, using no attempt, and another
    # worker finishes each exactly once
    for task_id in running:
        rec = fleet.store.get(task_id)
        assert rec is not None and rec.status is Status.QUEUED and rec.handbacks == 1
    fleet.start_worker(concurrency=2, **env)
    fleet.wait_all_terminal(ids, timeout_s=120)
    assert_each_ran_exactly_once(fleet, ids)
    for task_id in running:
        assert fleet.store.get(task_id).attempt == 2  # type: ignore[union-attr]
        assert len(started_by(fleet, task_id)) == 2  # the second resumed


def test_a_rolling_restart_of_every_worker_mid_batch_loses_and_repeats_nothing(
    fleet: Fleet,
) -> None:
    # given three workers working through a batch (hand-backs use no attempt; one spare
    # attempt covers a sandbox that fails to start while workers come and go)
    env = {"ACTFLEET_WORKER_SHUTDOWN_GRACE_S": "1", "ACTFLEET_MAX_ATTEMPTS": "2"}
    old = [fleet.start_worker(concurrency=3, **env) for _ in range(3)]
    ids = fleet.submit(30, prompt="slow") + fleet.submit(30)  # the first ones outlast a grace
    fleet.wait_mid_task(old[0].pid, n=2)

    # when each is replaced in turn: a new one starts, the old one gets SIGTERM
    for worker in old:
        fresh = fleet.start_worker(concurrency=3, **env)
        fleet.wait_healthy(fresh)
        fleet.wait_mid_task(worker.pid, n=1)
        assert fleet.sigterm(worker, timeout_s=60) == 0

    # then every task ends once, correct, with no step twice; some were handed back
    fleet.wait_all_terminal(ids, timeout_s=240)
    assert_each_ran_exactly_once(fleet, ids)
    assert fleet.finished_by_status() == {"completed": 60.0}
    handbacks = sum(fleet.store.get(t).handbacks for t in ids)  # type: ignore[union-attr]
    assert handbacks >= 1


OUTAGE_S = 130.0  # longer than the store's patience (120 s) and kombu's retry backoff (30 s)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_redis_down_longer_than_every_reconnect_window_and_the_fleet_recovers_by_itself(
    fleet: Fleet,
) -> None:
    # given the API, two workers with every slot busy, more tasks waiting, and a client
    # following one running task's events
    fleet.start_api()
    workers = [fleet.start_worker(concurrency=3) for _ in range(2)]
    for worker in workers:
        fleet.wait_healthy(worker)
    with fleet.api_client() as api:
        ids = [
            api.post("/v1/tasks", json={"prompt": f"count #{i}", "expected": {"answer": "3"}})
            .raise_for_status()
            .json()["id"]
            for i in range(10)
        ]
    for worker in workers:
        fleet.wait_mid_task(worker.pid, n=2)
    followed = fleet.leases_of(workers[0].pid)[0]
    lines: list[str] = []
    follower = threading.Thread(target=follow, args=(fleet, followed, lines), daemon=True)
    follower.start()
    time.sleep(1.5)  # the AOF has everything so far

    # when Redis is SIGKILLed and stays down longer than every reconnect window
    fleet.server.kill()
    time.sleep(10)
    # (meanwhile the API is not ready, and the workers are not ready but alive: a
    # supervisor must not restart them for an outage that is not theirs)
    with fleet.api_client_nokey() as api:
        assert api.get("/readyz").status_code == 503
    for worker in workers:
        assert fleet.health(worker).status_code == 200
        assert fleet.health(worker, "/readyz").status_code == 503
    time.sleep(OUTAGE_S - 10)
    fleet.server.start()

    # then the API's first requests succeed, the workers consume again by themselves, and
    # every task finishes exactly once, the interrupted ones resumed from their checkpoints
    with fleet.api_client() as api:
        assert api.get(f"/v1/tasks/{ids[0]}").status_code == 200
        assert api.get("/readyz").status_code == 200
    fleet.wait_all_terminal(ids, timeout_s=240)
    assert_each_ran_exactly_once(fleet, ids)
    for worker in workers:
        assert worker.poll() is None
        assert fleet.health(worker).json()["consumer"] == "ok"
    # and the client that followed a task through the outage saw each of its events once
    follower.join(timeout=30)
    stored = [i.decode() for i, _ in fleet.store.r.xrange(fleet.store.keys.events(followed))]
    assert [line.removeprefix("id: ") for line in lines if line.startswith("id: ")] == stored


def follow(fleet: Fleet, task_id: str, lines: list[str]) -> None:
    """Read the task's SSE stream through the API until the server ends it."""
    with (
        fleet.api_client() as api,
        api.stream(
            "GET", f"/v1/tasks/{task_id}/events", timeout=httpx.Timeout(30, read=None)
        ) as resp,
    ):
        for line in resp.iter_lines():
            lines.append(line)


def test_batch_counts_equal_a_recount_after_a_worker_is_killed_and_the_batch_cancelled(
    fleet: Fleet,
) -> None:
    # given a batch submitted through the API, two workers on it
    fleet.start_api()
    victim = fleet.start_worker(concurrency=4)
    fleet.start_worker(concurrency=4)
    lines = [json.dumps({"prompt": f"count #{i}", "expected": {"answer": "3"}}) for i in range(40)]
    with fleet.api_client() as c:
        batch_id = c.post("/v1/batches", content="\n".join(lines)).json()["id"]
        ids = [
            i.decode() for i in fleet.store.r.lrange(fleet.store.keys.batch_tasks(batch_id), 0, -1)
        ]
        seen: list[dict[str, int]] = []

        def status() -> dict[str, object]:
            out: dict[str, object] = c.get(f"/v1/batches/{batch_id}").json()
            seen.append(out["counts"])  # type: ignore[arg-type]
            return out

        # when one worker is SIGKILLed mid-task, and the batch is cancelled mid-way
        fleet.wait_mid_task(victim.pid, n=2)
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=10)
        wait_for(lambda: int(status()["finished"]) >= 8, 120)  # type: ignore[call-overload]
        assert c.post(f"/v1/batches/{batch_id}/cancel").status_code == 202
        fleet.wait_all_terminal(ids, timeout_s=180)
        final = status()

    # then every poll saw each task in exactly one status, and the counters equal a recount
    assert all(sum(counts.values()) == 40 for counts in seen), seen
    rows = []
    for task_id in ids:
        rec = fleet.store.get(task_id)
        assert rec is not None and rec.result is not None
        rows.append((rec.status.value, rec.result.to_dict()))
    recount = tally(rows)
    assert final["counts"] == {s.value: recount[s.value] for s in Status}
    assert final["finished"] == recount["finished"] == 40 and final["status"] == "cancelled"
    k = fleet.store.keys
    stored = sum_counters(fleet.store.r.hgetall(k.batch_counts(batch_id, s)) for s in k.shard_ids)
    assert stored.pop("total") == 40  # the shards' parts add up to the batch
    assert {k: n for k, n in stored.items() if n} == {k: n for k, n in recount.items() if n}
    assert 0 < recount["cancelled"] < 40 and recount["completed"] > 0
