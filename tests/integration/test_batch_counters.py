"""A batch's counters against a real redis-server: every transition that changes a task's
status moves its batch's counts with it, once, so the counts always equal a recount of the
records (``store.batches.tally``), whatever order deliveries, sweeps and cancels come in."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from agent.events import Event, EventType
from agent.models import FailureClass, Result, Status, TaskSpec, Usage
from store.api_store import ApiStore, connect
from store.batches import sum_counters, tally
from store.worker_store import Claim, Dropped, WorkerStore
from tests.integration.conftest import Clock
from tests.records import create, new_record

BATCH = "batch_c"


def queued(store: WorkerStore, n: int = 1) -> list[str]:
    ids = []
    for i in range(n):
        rec = new_record(TaskSpec(prompt=f"2+{i}?"), batch_id=BATCH)
        create(store, rec)
        ids.append(rec.id)
    return ids


def counters(store: WorkerStore) -> dict[str, int]:
    k = store.keys
    raw = sum_counters(store.r.hgetall(k.batch_counts(BATCH, s)) for s in k.shard_ids)
    return {name: n for name, n in raw.items() if n and name != "total"}


def recount(store: WorkerStore) -> dict[str, int]:
    ids = [i.decode() for i in store.r.lrange(store.keys.batch_tasks(BATCH), 0, -1)]
    rows = []
    for task_id in ids:
        status, result = store.r.hmget(store.keys.task(task_id), ["status", "result"])
        assert status is not None
        rows.append((status.decode(), json.loads(result) if result else None))
    return {k: n for k, n in tally(rows).items() if n}


def claimed(store: WorkerStore, task_id: str, worker: str = "w1", **kw: Any) -> Claim:
    claim = store.claim(task_id, worker, 3, batch_id=BATCH, **kw)
    assert isinstance(claim, Claim), claim
    return claim


def finished_event() -> Event:
    return Event(EventType.FINISHED, turn=1, attempt=1, ts=time.time())


def answer(correct: bool | None = True, turns: int = 2) -> Result:
    return Result(
        Status.COMPLETED,
        answer="4",
        correct=correct,
        turns=turns,
        usage=Usage(prompt_tokens=100, completion_tokens=10),
    )


def test_queued_then_running_then_done_moves_one_task_through_the_counts(
    store: WorkerStore,
) -> None:
    [task_id] = queued(store)
    assert counters(store) == {"queued": 1}

    claim = claimed(store, task_id)
    assert counters(store) == {"running": 1}

    assert store.finish(claim.record, claim.owner, answer(), finished_event())
    assert counters(store) == recount(store)
    assert counters(store) == {
        "completed": 1,
        "finished": 1,
        "turns": 2,
        "prompt_tokens": 100,
        "completion_tokens": 10,
        "correct": 1,
        "succeeded": 1,
    }


def test_a_wrong_answer_is_finished_but_not_a_success(store: WorkerStore) -> None:
    a, b, c = queued(store, 3)
    for task_id, correct in ((a, False), (b, None), (c, True)):
        claim = claimed(store, task_id)
        store.finish(claim.record, claim.owner, answer(correct), finished_event())

    got = counters(store)
    assert got == recount(store)
    assert (got["finished"], got["correct"], got["succeeded"]) == (3, 1, 2)


def test_duplicate_deliveries_and_repeated_finishes_count_nothing_twice(
    store: WorkerStore,
) -> None:
    [task_id] = queued(store)
    claim = claimed(store, task_id)

    assert store.claim(task_id, "w2", 3, batch_id=BATCH) == Dropped("duplicate")
    assert counters(store) == {"running": 1}
    store.finish(claim.record, claim.owner, answer(), finished_event())
    store.finish(claim.record, claim.owner, answer(), finished_event())
    assert store.claim(task_id, "w2", 3, batch_id=BATCH) == Dropped("terminal")

    assert counters(store) == recount(store)
    assert counters(store)["completed"] == 1


def test_a_message_that_names_no_batch_or_another_still_counts_the_records_batch(
    store: WorkerStore,
) -> None:
    a, b = queued(store, 2)

    claimed_a = store.claim(a, "w1", 3)  # an old message: no batch in it
    claimed_b = store.claim(b, "w1", 3, batch_id="batch_other")

    assert isinstance(claimed_a, Claim) and isinstance(claimed_b, Claim)
    assert counters(store) == {"running": 2}
    assert not any(store.r.exists(store.keys.batch_counts("batch_other", s)) for s in range(16))


def test_a_retried_attempt_goes_back_to_queued_and_runs_again(store: WorkerStore) -> None:
    [task_id] = queued(store)
    first = claimed(store, task_id)

    assert store.release(task_id, first.owner, 5.0, BATCH)
    assert counters(store) == {"queued": 1}
    assert not store.release(task_id, first.owner, 5.0, BATCH)  # fenced: nothing moves
    assert counters(store) == {"queued": 1}

    second = claimed(store, task_id, "w2")
    assert second.attempt == 2 and counters(store) == {"running": 1}
    store.finish(second.record, second.owner, answer(), finished_event())
    assert counters(store) == recount(store)


def test_a_handed_back_task_is_queued_again(store: WorkerStore) -> None:
    [task_id] = queued(store)
    claim = claimed(store, task_id)

    assert store.hand_back(task_id, claim.owner, BATCH) is not None
    assert counters(store) == {"queued": 1} == recount(store)


def test_a_sweep_of_an_expired_lease_requeues_it_once(store: WorkerStore, clock: Clock) -> None:
    a, b = queued(store, 2)
    claimed(store, a)
    released = claimed(store, b)
    store.release(b, released.owner, 0.0, BATCH)  # queued already, in the running index
    store.r.delete(store.keys.lease(a))  # a's worker died
    clock.now += 60

    out = store.sweep("s1", max_attempts=3)
    again = store.sweep("s1", max_attempts=3)

    assert sorted(out.requeue) == sorted([a, b]) and again.requeue == ()
    assert counters(store) == {"queued": 2} == recount(store)


def test_a_sweep_of_an_exhausted_task_finishes_it_as_error(
    store: WorkerStore, clock: Clock
) -> None:
    [task_id] = queued(store)
    claim = claimed(store, task_id)
    for _ in range(2):  # two more attempts whose workers die
        store.r.delete(store.keys.lease(task_id))
        clock.now += 60
        store.sweep("s1", max_attempts=3)
        claim = claimed(store, task_id)
    store.r.delete(store.keys.lease(task_id))
    clock.now += 60

    out = store.sweep("s1", max_attempts=3)
    [(swept, owner)] = out.exhausted
    assert swept == task_id
    lost = Result(Status.ERROR, FailureClass.WORKER_LOST, attempt=claim.attempt)
    assert store.finish(claim.record, owner, lost, finished_event())

    assert counters(store) == {"error": 1, "finished": 1} == recount(store)


def test_a_requeued_lost_message_changes_no_count(store: WorkerStore, clock: Clock) -> None:
    [task_id] = queued(store)
    clock.now += 120

    lost = store.requeue_lost(60.0, ["nothing-here"], queue_was_empty=True)

    assert lost.requeue == (task_id,)
    assert counters(store) == {"queued": 1}
    claim = claimed(store, task_id)
    assert store.claim(task_id, "w2", 3, batch_id=BATCH) == Dropped("duplicate")  # the old one
    store.finish(claim.record, claim.owner, answer(), finished_event())
    assert counters(store) == recount(store)


def test_cancelling_a_queued_and_a_running_task(redis_url: str, store: WorkerStore) -> None:
    waiting, busy = queued(store, 2)
    claim = claimed(store, busy)

    async def cancel() -> None:
        client = connect(redis_url)
        try:
            api = ApiStore(client, store.keys)
            assert await api.cancel_task("t_test", waiting) is not None
            assert await api.cancel_task("t_test", busy) is not None
        finally:
            await client.aclose()

    asyncio.run(cancel())
    assert counters(store) == {"cancelled": 1, "finished": 1, "running": 1}
    stopped = Result(Status.CANCELLED, FailureClass.CANCELLED, attempt=1)
    store.finish(claim.record, claim.owner, stopped, finished_event())

    assert counters(store) == {"cancelled": 2, "finished": 2} == recount(store)


def claim_calls(store: WorkerStore) -> int:
    """CLAIM's runs so far (each one round trip: MATERIALIZE rides in its pipeline)."""
    stats = store.r.info("commandstats")
    scripts = sum(int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in ("evalsha", "eval"))
    return scripts // 2


def test_a_claim_whose_message_names_the_batch_is_one_round_trip(store: WorkerStore) -> None:
    first, named, unnamed = queued(store, 3)
    claimed(store, first)  # the script is loaded

    before = claim_calls(store)
    claimed(store, named)
    one = claim_calls(store) - before
    before = claim_calls(store)
    store.claim(unnamed, "w1", 3)  # the message names no batch: the claim learns it, again
    two = claim_calls(store) - before

    assert (one, two) == (1, 2)
