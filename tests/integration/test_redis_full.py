"""A worker against a real redis-server that is out of memory (``maxmemory`` with
``noeviction``): its writes wait for room instead of failing, so no step is lost."""

from __future__ import annotations

import threading
import time

import redis

from agent.events import Event, EventType
from agent.models import Result, Status, TaskSpec
from store.keys import Keys
from store.worker_store import Appended, Claim, WorkerStore
from tests.records import create, new_record

FILLER_CHUNK = 256 * 1024


def fill(r: redis.Redis, filler_bytes: int = 4 << 20) -> int:
    """Make Redis full: write ``filler_bytes`` of filler, then set ``maxmemory`` below what
    it now uses (``noeviction``), so it refuses every write until the filler goes. Returns
    the number of filler keys."""
    n = filler_bytes // FILLER_CHUNK
    for i in range(n):
        r.set(f"filler:{i}", b"x" * FILLER_CHUNK)
    used = int(r.info("memory")["used_memory"])
    r.config_set("maxmemory-policy", "noeviction")
    r.config_set("maxmemory", str(used - filler_bytes // 2))
    return n


def free_later(r: redis.Redis, filler_keys: int, after_s: float) -> threading.Thread:
    def free() -> None:
        time.sleep(after_s)
        r.delete(*[f"filler:{i}" for i in range(filler_keys)])

    thread = threading.Thread(target=free, daemon=True)
    thread.start()
    return thread


def running_task(r: redis.Redis) -> tuple[WorkerStore, Claim]:
    """A worker store that waits up to 30 s for room, and a task it has claimed."""
    store = WorkerStore(r, Keys("t"), patience_s=30)
    rec = new_record(TaskSpec(prompt="2+2?"))
    create(store, rec)
    claim = store.claim(rec.id, "w1", max_attempts=3)
    assert isinstance(claim, Claim)
    return store, claim


def test_a_step_written_while_redis_is_full_waits_for_room_and_lands_once(redis_url: str) -> None:
    # given a running task, and then a Redis that is full
    r = redis.Redis.from_url(redis_url)
    store, claim = running_task(r)
    rec = claim.record
    keys = fill(r)
    # when the worker appends its next step while room comes back a moment later
    freed = free_later(r, keys, after_s=0.5)
    step = Event(EventType.LLM_REPLY, turn=1, attempt=1, ts=time.time(), data={"text": "x"})
    out = store.append(rec.id, claim.owner, step, claim.seq + 1, '{"turn":1,"messages":[]}')
    freed.join()
    # then the step was written, once, after the task.started event
    assert out is Appended.OK
    assert [e.type for e in store.events(rec.id)] == [EventType.STARTED, EventType.LLM_REPLY]
    # and the task finishes normally afterwards
    finished = Event(EventType.FINISHED, turn=1, attempt=1, ts=time.time())
    assert store.finish(claim.record, claim.owner, Result(Status.COMPLETED, answer="4"), finished)
    assert store.get(rec.id).status is Status.COMPLETED  # type: ignore[union-attr]


def test_a_finish_refused_for_memory_changes_nothing_until_it_lands(redis_url: str) -> None:
    # given a running task and a full Redis
    r = redis.Redis.from_url(redis_url)
    store, claim = running_task(r)
    rec = claim.record
    keys = fill(r)
    before = r.hgetall(Keys("t").task(rec.id))
    # when the worker finishes it while room comes back later
    seen: dict[str, object] = {}

    def watch() -> None:
        time.sleep(0.2)  # while the finish waits: the record is as it was
        seen["record"] = r.hgetall(Keys("t").task(rec.id))

    watcher = threading.Thread(target=watch)
    watcher.start()
    freed = free_later(r, keys, after_s=0.6)
    finished = Event(EventType.FINISHED, turn=1, attempt=1, ts=time.time())
    written = store.finish(
        claim.record, claim.owner, Result(Status.COMPLETED, answer="4"), finished
    )
    watcher.join()
    freed.join()
    # then nothing was half written meanwhile, and the finish landed whole afterwards
    assert seen["record"] == before
    assert written is not None
    assert store.get(rec.id).status is Status.COMPLETED  # type: ignore[union-attr]
    assert [e.type for e in store.events(rec.id)][-1] is EventType.FINISHED
