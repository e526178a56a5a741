"""store.worker_store against a real redis-server: claims, duplicates, fencing, finish-once,
sweep."""

from __future__ import annotations

import time

import pytest

from agent.events import Event, EventType
from agent.models import FailureClass, Result, Status, TaskSpec
from store.worker_store import Appended, Claim, Dropped, EventsBehind, WorkerStore
from tests.integration.conftest import Clock
from tests.records import create, new_record


def queued(store: WorkerStore, **kw: object) -> str:
    rec = new_record(TaskSpec(prompt="2+2?"), **kw)
    create(store, rec)
    return rec.id


def ev(kind: EventType, turn: int, attempt: int = 1) -> Event:
    return Event(kind, turn=turn, attempt=attempt, ts=time.time())


def done(attempt: int = 1) -> Result:
    return Result(Status.COMPLETED, answer="4", turns=1, attempt=attempt)


def test_first_delivery_takes_the_lease_as_attempt_one(store: WorkerStore) -> None:
    task_id = queued(store)

    claim = store.claim(task_id, "w1")

    assert isinstance(claim, Claim)
    assert (claim.attempt, claim.owner, claim.seq, claim.checkpoint) == (1, "w1/1", 0, None)
    assert claim.record == store.get(task_id)  # the record as the claim left it
    rec = store.get(task_id)
    assert rec is not None and rec.status is Status.RUNNING and rec.attempt == 1
    assert rec.started_at == pytest.approx(claim.started_at)
    assert store.lease_owner(task_id) == "w1/1"


def test_a_claim_within_max_attempts_appends_task_started(store: WorkerStore, clock: Clock) -> None:
    task_id = queued(store)
    first = store.claim(task_id, "w1", max_attempts=2)
    assert isinstance(first, Claim) and first.seq == 1
    [started] = store.events(task_id)
    assert (started.type, started.turn, started.attempt) == (EventType.STARTED, 0, 1)
    assert started.ts == first.started_at == clock.now
    assert started.data == {"worker": "w1", "resumed": False}

    # the attempt checkpoints its second turn, then its worker dies: the next one resumes
    step = store.append(task_id, first.owner, ev(EventType.LLM_REPLY, 2), 2, '{"turn":2}')
    assert step is Appended.OK
    store.r.delete(store.keys.lease(task_id))
    clock.now += 60
    second = store.claim(task_id, "w2", max_attempts=2)
    assert isinstance(second, Claim) and second.seq == 3
    resumed = store.events(task_id)[-1]
    assert (resumed.type, resumed.turn, resumed.attempt) == (EventType.STARTED, 2, 2)
    assert resumed.ts == clock.now and resumed.data == {"worker": "w2", "resumed": True}

    # an attempt beyond max_attempts is claimed (to be finished as exhausted), unannounced
    store.r.delete(store.keys.lease(task_id))
    third = store.claim(task_id, "w3", max_attempts=2)
    assert isinstance(third, Claim) and (third.attempt, third.seq) == (3, 3)
    assert len(store.events(task_id)) == 3


def test_the_claims_task_started_entry_is_event_to_json_byte_for_byte(
    store: WorkerStore, clock: Clock
) -> None:
    worker = 'w"\\ é 🚀 \u2028/1'  # quotes, a backslash, non-ASCII, a JSON-sensitive char
    task_id = queued(store)
    first = store.claim(task_id, worker, max_attempts=3)
    assert isinstance(first, Claim)
    store.append(task_id, first.owner, ev(EventType.LLM_REPLY, 4), 2, '{"turn":4}')
    store.r.delete(store.keys.lease(task_id))
    clock.now += 1.25
    second = store.claim(task_id, worker, max_attempts=3)
    assert isinstance(second, Claim)

    raw = [f[b"e"].decode() for _, f in store.r.xrange(store.keys.events(task_id))]
    fresh = Event(EventType.STARTED, 0, 1, first.started_at, {"worker": worker, "resumed": False})
    resumed = Event(EventType.STARTED, 4, 2, clock.now, {"worker": worker, "resumed": True})
    assert raw[0] == fresh.to_json()
    assert raw[2] == resumed.to_json()


def test_a_second_delivery_while_the_lease_is_live_is_dropped(store: WorkerStore) -> None:
    task_id = queued(store)
    store.claim(task_id, "w1")

    assert store.claim(task_id, "w2") == Dropped("duplicate")
    assert store.get(task_id).attempt == 1  # type: ignore[union-attr]


def test_a_late_delivery_of_a_finished_task_is_dropped(store: WorkerStore) -> None:
    task_id = queued(store)
    claim = store.claim(task_id, "w1")
    assert isinstance(claim, Claim)
    assert store.finish(claim.record, claim.owner, done(), ev(EventType.FINISHED, 1))

    assert store.claim(task_id, "w2") == Dropped("terminal")
    assert store.claim("task_nope", "w2") == Dropped("missing")


def test_appends_are_fenced_by_the_lease_and_idempotent_per_seq(store: WorkerStore) -> None:
    task_id = queued(store)
    claim = store.claim(task_id, "w1")
    assert isinstance(claim, Claim)

    ok = store.append(task_id, claim.owner, ev(EventType.LLM_REPLY, 1), 1, '{"turn":1}')
    # the same step again (a retried call whose reply was lost) adds nothing
    again = store.append(task_id, claim.owner, ev(EventType.LLM_REPLY, 1), 1, '{"turn":1}')
    # a stale owner writes nothing
    stale = store.append(task_id, "w0/0", ev(EventType.EXEC_RESULT, 1), 2)
    # a step beyond what Redis holds (it lost writes in a crash) is refused as a gap
    gap = store.append(task_id, claim.owner, ev(EventType.LLM_REPLY, 3), 3)

    assert (ok, again, stale, gap) == (Appended.OK, Appended.OK, Appended.FENCED, Appended.GAP)

    assert [(e.type, e.turn) for e in store.events(task_id)] == [(EventType.LLM_REPLY, 1)]


def test_a_task_finishes_exactly_once_and_only_by_its_owner(store: WorkerStore) -> None:
    task_id = queued(store, batch_id="batch_1")
    claim = store.claim(task_id, "w1")
    assert isinstance(claim, Claim)

    assert store.finish(claim.record, "w9/1", done(), ev(EventType.FINISHED, 1)) is None
    assert store.finish(claim.record, claim.owner, done(), ev(EventType.FINISHED, 1))
    assert store.finish(claim.record, claim.owner, done(), ev(EventType.FINISHED, 1)) is None

    rec = store.get(task_id)
    assert rec is not None and rec.status is Status.COMPLETED and rec.result == done()
    finished = [e for e in store.events(task_id) if e.type is EventType.FINISHED]
    assert len(finished) == 1
    counts_key = store.keys.batch_counts("batch_1", store.keys.shard(task_id))
    counts = {k: int(v) for k, v in store.r.hgetall(counts_key).items() if v != b"0"}
    assert counts == {b"completed": 1, b"finished": 1, b"turns": 1, b"succeeded": 1, b"total": 1}
    assert store.r.zcard(store.keys.running(store.keys.shard(task_id))) == 0
    assert store.r.ttl(store.keys.events(task_id)) > 0


def test_finish_appends_the_last_step_once_and_refuses_a_gap(store: WorkerStore) -> None:
    task_id = queued(store)
    claim = store.claim(task_id, "w1")
    assert isinstance(claim, Claim)
    assert store.append(task_id, claim.owner, ev(EventType.STARTED, 0), 1) is Appended.OK
    # a last step two ahead of what Redis holds (it lost a write): nothing is written
    ahead = (ev(EventType.LLM_REPLY, 1), 3)
    with pytest.raises(EventsBehind):
        store.finish(claim.record, claim.owner, done(), ev(EventType.FINISHED, 1), ahead)
    assert store.get(task_id).status is Status.RUNNING  # type: ignore[union-attr]
    assert [e.type for e in store.events(task_id)] == [EventType.STARTED]

    # the next step in line goes in just before the terminal event, and counts as a step
    last = (ev(EventType.LLM_REPLY, 1), 2)
    assert store.finish(claim.record, claim.owner, done(), ev(EventType.FINISHED, 1), last)
    assert store.finish(claim.record, claim.owner, done(), ev(EventType.FINISHED, 1), last) is None
    assert [e.type for e in store.events(task_id)] == [
        EventType.STARTED,
        EventType.LLM_REPLY,
        EventType.FINISHED,
    ]
    assert store.r.hget(store.keys.task(task_id), "seq") == b"2"


def test_heartbeat_renews_leases_and_reports_cancel_requests(
    store: WorkerStore, clock: Clock
) -> None:
    a, b = queued(store), queued(store)
    ca, cb = store.claim(a, "w1"), store.claim(b, "w1")
    assert isinstance(ca, Claim) and isinstance(cb, Claim)
    store.r.hset(store.keys.task(b), "cancel_requested", "1")

    states = store.renew([(a, ca.owner, 1), (b, cb.owner, 1), (a, "w2/7", 7)])

    assert states[b].held and states[b].cancel_requested
    assert not states[a].held  # the last entry for ``a`` was a stale owner
    assert store.renew([(a, ca.owner, 1)])[a].held


def test_a_lease_lost_by_a_redis_restart_is_taken_back_by_its_live_owner(
    store: WorkerStore,
) -> None:
    task_id = queued(store)
    claim = store.claim(task_id, "w1")
    assert isinstance(claim, Claim)
    store.r.delete(store.keys.lease(task_id))  # as if the last second of AOF was lost

    assert store.renew([(task_id, claim.owner, claim.attempt)])[task_id].held
    assert store.lease_owner(task_id) == claim.owner


def test_the_sweeper_requeues_a_task_whose_worker_died(store: WorkerStore, clock: Clock) -> None:
    task_id = queued(store)
    claim = store.claim(task_id, "w1")
    assert isinstance(claim, Claim)
    store.append(task_id, claim.owner, ev(EventType.LLM_REPLY, 1), 1, '{"turn":1}')
    store.r.delete(store.keys.lease(task_id))  # the worker died; its lease expired

    assert store.sweep("w2", max_attempts=3).requeue == ()  # within the grace period
    clock.now += 60
    out = store.sweep("w2", max_attempts=3)
    assert out.requeue == (task_id,)
    assert store.sweep("w3", max_attempts=3).requeue == ()  # only one sweeper requeues it

    # the new delivery resumes from the checkpoint as attempt 2, and the old owner is fenced
    again = store.claim(task_id, "w2")
    assert isinstance(again, Claim)
    assert (again.attempt, again.seq, again.checkpoint) == (2, 1, {"turn": 1})
    assert again.started_at == pytest.approx(claim.started_at)
    stale = store.append(task_id, claim.owner, ev(EventType.EXEC_RESULT, 1), 2)
    assert stale is Appended.FENCED


def test_a_task_that_keeps_killing_workers_ends_as_worker_lost(
    store: WorkerStore, clock: Clock
) -> None:
    task_id = queued(store)
    for n in (1, 2):
        assert isinstance(store.claim(task_id, f"w{n}"), Claim)
        store.r.delete(store.keys.lease(task_id))
        clock.now += 60
        if n < 2:
            assert store.sweep("s", max_attempts=2).requeue == (task_id,)

    out = store.sweep("s", max_attempts=2)
    assert out.requeue == () and len(out.exhausted) == 1
    swept_id, owner = out.exhausted[0]
    rec = store.get(task_id)
    assert rec is not None and swept_id == task_id and owner == "s/2"
    result = Result(Status.ERROR, FailureClass.WORKER_LOST, attempt=2)
    assert store.finish(rec, owner, result, ev(EventType.FINISHED, 0, 2))
    assert store.get(task_id).status is Status.ERROR  # type: ignore[union-attr]


def test_a_released_task_is_claimable_at_once_and_swept_if_nobody_does(
    store: WorkerStore, clock: Clock
) -> None:
    task_id = queued(store)
    claim = store.claim(task_id, "w1")
    assert isinstance(claim, Claim)

    assert store.release(task_id, claim.owner, reclaim_after_s=5)
    assert not store.release(task_id, claim.owner, reclaim_after_s=5)  # fenced now
    assert store.get(task_id).status is Status.QUEUED  # type: ignore[union-attr]

    clock.now += 60
    assert store.sweep("w2", max_attempts=3).requeue == (task_id,)
    assert isinstance(store.claim(task_id, "w2"), Claim)


def test_a_finished_task_with_a_webhook_is_due_in_the_outbox_at_once(
    store: WorkerStore, clock: Clock
) -> None:
    # Given two tasks, one with a webhook, that finish
    hooked = new_record(
        TaskSpec.from_dict({"prompt": "x", "webhook": {"url": "http://h.example/x"}})
    )
    create(store, hooked)
    plain = queued(store)
    for task_id in (hooked.id, plain):
        claim = store.claim(task_id, "w1")
        assert isinstance(claim, Claim)
        assert store.finish(claim.record, claim.owner, done(), ev(EventType.FINISHED, 1))
    # Then only the hooked one is in the outbox, due when it finished (the delivery loop
    # of any worker takes it from there; see tests/integration/test_webhook_delivery.py)
    k = store.keys
    due = [
        e for s in k.shard_ids for e in store.r.zrange(k.webhook_outbox(s), 0, -1, withscores=True)
    ]
    assert due == [(hooked.id.encode(), pytest.approx(clock.now))]


def test_a_finished_task_keeps_its_result_but_not_its_checkpoint(store: WorkerStore) -> None:
    # given a running task with a checkpoint after its first step
    task_id = queued(store)
    claim = store.claim(task_id, "w1")
    assert isinstance(claim, Claim)
    step = ev(EventType.LLM_REPLY, 1)
    assert store.append(task_id, claim.owner, step, claim.seq + 1, '{"turn":1}') is Appended.OK
    assert store.r.hexists(store.keys.task(task_id), "checkpoint")
    # when it finishes
    assert store.finish(claim.record, claim.owner, done(), ev(EventType.FINISHED, 1))
    # then the checkpoint (a copy of the trajectory) is gone and the result is there
    assert not store.r.hexists(store.keys.task(task_id), "checkpoint")
    rec = store.get(task_id)
    assert rec is not None and rec.result is not None and rec.result.answer == "4"


def test_a_fenced_finish_leaves_the_running_tasks_checkpoint(store: WorkerStore) -> None:
    task_id = queued(store)
    claim = store.claim(task_id, "w1")
    assert isinstance(claim, Claim)
    store.append(task_id, claim.owner, ev(EventType.LLM_REPLY, 1), claim.seq + 1, '{"turn":1}')
    assert store.finish(claim.record, "w2/9", done(), ev(EventType.FINISHED, 1)) is None
    assert store.r.hget(store.keys.task(task_id), "checkpoint") == b'{"turn":1}'
