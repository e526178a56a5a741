"""A queued task whose broker message is gone gets a new one, once; a task waiting behind a
backlog never does. Real redis-server, real broker messages, a controlled clock."""

from __future__ import annotations

from agent.models import Status, TaskSpec
from store import keys
from store.celery_app import run_task_pushes
from store.worker_store import Claim, WorkerStore
from tests.integration.conftest import Clock
from tests.records import create, new_record
from workers.metrics import queue_names

GRACE_S = 60.0
QUEUES = queue_names(keys.TASK_QUEUE)


def queued_count(store: WorkerStore) -> int:
    """Entries in the queued index, over every shard."""
    return sum(int(store.r.zcard(store.keys.queued(s))) for s in store.keys.shard_ids)


def submit(store: WorkerStore, clock: Clock, n: int, *, push: bool = True) -> list[str]:
    """Tasks as the API queues them: records in the queued index, then their messages."""
    ids = []
    for _ in range(n):
        rec = new_record(TaskSpec(prompt="2+2?"), created_at=clock.now)
        create(store, rec)
        ids.append(rec.id)
    if push:
        for queue, messages in run_task_pushes(ids, int(clock.now * 1000)):
            store.r.lpush(queue, *messages)
    return ids


def sweep(store: WorkerStore, was_empty: bool) -> tuple[tuple[str, ...], bool]:
    out = store.requeue_lost(GRACE_S, QUEUES, was_empty)
    return out.requeue, out.queue_empty


def take(store: WorkerStore, worker: str) -> Claim:
    """Pop the oldest message and claim it, as a worker does."""
    import base64
    import json

    raw = store.r.rpop(keys.TASK_QUEUE)
    assert raw is not None
    body = json.loads(base64.b64decode(json.loads(raw)["body"]))
    (task_id,), kwargs, _ = body
    claim = store.claim(task_id, worker, enqueued_ms=kwargs["enqueued_ms"])
    assert isinstance(claim, Claim)
    return claim


def test_a_task_without_a_message_on_an_empty_queue_is_enqueued_again_once(
    store: WorkerStore, clock: Clock
) -> None:
    # given a queued task whose message never made it to the queue
    [task_id] = submit(store, clock, 1, push=False)

    # then within the grace nothing happens, however empty the queue
    clock.now += GRACE_S - 1
    assert sweep(store, was_empty=True) == ((), True)
    # and past it, a queue seen empty only once is not enough (a message may be between
    # a worker's pop and its claim)
    clock.now += 2
    assert sweep(store, was_empty=False) == ((), True)
    # when it was empty at the previous look too, the task gets a new message, once
    assert sweep(store, was_empty=True) == ((task_id,), True)
    assert sweep(store, was_empty=True) == ((), True)
    assert store.get(task_id).status is Status.QUEUED  # type: ignore[union-attr]
    # and if that one is lost too, it is given another after the grace again
    clock.now += GRACE_S + 1
    assert sweep(store, was_empty=True) == ((task_id,), True)


def test_a_backlog_is_never_enqueued_twice_however_long_it_waits(
    store: WorkerStore, clock: Clock
) -> None:
    # given 200 queued tasks, all with their messages, and workers taking a few at a time
    ids = submit(store, clock, 200)
    was_empty = False
    for _ in range(20):  # ten minutes
        clock.now += 30
        take(store, "w1")
        requeued, was_empty = sweep(store, was_empty)
        # then none of the waiting ones is pushed again
        assert requeued == ()
    assert store.r.llen(keys.TASK_QUEUE) == 180
    assert queued_count(store) == 180  # the claimed ones left the index
    assert len(ids) == 200


def test_a_message_lost_in_the_queue_is_replaced_once_a_later_one_was_taken(
    store: WorkerStore, clock: Clock
) -> None:
    # given a task whose message is lost (say Redis crashed after accepting it), one
    # submitted 50 s later whose message is not in the queue either, and one 100 s later
    [lost] = submit(store, clock, 1, push=False)
    clock.now += 50
    [soon_after] = submit(store, clock, 1, push=False)
    clock.now += 50
    [later] = submit(store, clock, 1)

    # when a worker takes the latest one (FIFO: everything pushed before it was taken too)
    clock.now += 1
    take(store, "w1")

    # then the lost task, pushed more than the grace before it, gets a new message; the
    # one pushed within the grace before it does not (its message may be in flight)
    assert sweep(store, was_empty=False) == ((lost,), True)
    assert sweep(store, was_empty=False) == ((), True)
    assert store.r.zscore(store.keys.queued(store.keys.shard(soon_after)), soon_after) is not None
    assert store.r.zscore(store.keys.queued(store.keys.shard(later)), later) is None


def test_a_finished_or_running_task_just_leaves_the_queued_index(
    store: WorkerStore, clock: Clock
) -> None:
    # given two tasks whose messages were lost, one cancelled meanwhile, one running
    cancelled, running = submit(store, clock, 2, push=False)
    store.r.hset(store.keys.task(cancelled), "status", "cancelled")
    store.r.hset(store.keys.task(running), "status", "running")
    store.r.set(store.keys.lease(running), "w9/1")

    clock.now += GRACE_S + 1
    sweep(store, was_empty=True)
    assert sweep(store, was_empty=True) == ((), True)
    assert queued_count(store) == 0
