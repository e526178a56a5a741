"""The shard layout (store.keys): every key a task's transitions touch is in one hash slot,
and a large batch spreads over every shard."""

from __future__ import annotations

from redis.crc import key_slot

from agent.events import Event, EventType
from agent.models import Result, Status
from store.keys import SHARDS, Keys
from store.records import new_batch_id, new_task_id
from store.scripts import finish_call


def slot(key: str) -> int:
    return int(key_slot(key.encode()))


def test_every_key_finish_touches_is_in_the_tasks_slot() -> None:
    k = Keys("af")
    for _ in range(200):
        task_id, batch_id = new_task_id(), new_batch_id()
        names, _ = finish_call(
            k,
            task_id,
            "acme",
            batch_id,
            owner="w/1",
            result=Result(Status.COMPLETED, answer="4"),
            event=Event(EventType.FINISHED, 1, 1, 0.0),
            finished_at=0.0,
        )
        assert len(names) == 9
        assert {slot(n) for n in names} == {slot(k.task(task_id))}


def test_a_tasks_record_lease_stream_indexes_and_webhook_share_its_shards_slot() -> None:
    k = Keys("af")
    task_id, batch_id = new_task_id(), new_batch_id()
    s = k.shard(task_id)
    names = [
        k.task(task_id),
        k.lease(task_id),
        k.events(task_id),
        k.running(s),
        k.queued(s),
        k.queue_taken(s),
        k.batch_counts(batch_id, s),
        k.webhook_outbox(s),
        k.webhook(task_id),
        k.webhook_attempts(task_id),
        k.webhooks_disabled("acme", s),
    ]
    assert len({slot(n) for n in names}) == 1
    # a batch's own record, task list and webhook are in the batch's shard
    b = k.shard(batch_id)
    batch_keys = [k.batch(batch_id), k.batch_tasks(batch_id), k.webhook_outbox(b)]
    assert len({slot(n) for n in [*batch_keys, k.webhook(batch_id)]}) == 1


def test_a_large_batch_spreads_over_every_shard() -> None:
    k = Keys("af")
    shards = [k.shard(new_task_id()) for _ in range(2000)]
    assert set(shards) == set(range(SHARDS))
    assert min(shards.count(s) for s in range(SHARDS)) > 2000 / SHARDS / 2
    assert len({slot(k.running(s)) for s in k.shard_ids}) == SHARDS
