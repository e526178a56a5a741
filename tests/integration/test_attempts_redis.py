"""A task's attempt on the real store (``store.worker_store.WorkerStore`` on a real redis-server): the
ends the unit tests reach on the in-memory fake (tests/unit/test_attempts.py) end the same
here, so the fake keeps the scripts' rules."""

from __future__ import annotations

import pytest
import redis

from agent.errors import SandboxError
from agent.events import EventType
from agent.models import FailureClass, Status
from store.keys import Keys
from store.worker_store import WorkerStore
from tests.records import create
from tests.unit.test_attempts import ANSWER, CODE, TASK, World, then
from workers.attempts import Done, RetryAfter


@pytest.fixture
def store(redis_url: str) -> WorkerStore:
    return WorkerStore(redis.Redis.from_url(redis_url), Keys("t"), lease_ttl_s=30)


def world(store: WorkerStore, replies: list[object], **settings: object) -> World:
    return World(replies, store, put=lambda record: create(store, record), **settings)  # type: ignore[arg-type]


def types(store: WorkerStore) -> list[EventType]:
    return [e.type for e in store.events(TASK)]


def test_done(store: WorkerStore) -> None:
    w = world(store, [CODE, ANSWER])
    w.add()
    assert w.run() == Done("finished")
    rec = store.get(TASK)
    assert rec is not None and rec.status is Status.COMPLETED
    assert types(store) == [
        EventType.STARTED,
        EventType.LLM_REPLY,
        EventType.EXEC_RESULT,
        EventType.LLM_REPLY,
        EventType.FINISHED,
    ]
    assert w.run() == Done("dropped:terminal")


def test_fenced(store: WorkerStore) -> None:
    w = world(store, [then(lambda: store.r.set(store.keys.lease(TASK), "w2/2"), CODE)])
    w.add()
    assert w.run() == Done("fenced")
    assert types(store) == [EventType.STARTED] and store.lease_owner(TASK) == "w2/2"


def test_regressed(store: WorkerStore) -> None:
    def crash() -> None:  # Redis lost the claim's task.started
        store.r.hincrby(store.keys.task(TASK), "seq", -1)

    w = world(store, [then(crash, CODE)])
    w.add()
    assert w.run() == RetryAfter(0.5, "state_regressed")
    rec = store.get(TASK)
    assert rec is not None and rec.status is Status.QUEUED and store.lease_owner(TASK) is None


def test_infrastructure_fault_retried_then_given_up(store: WorkerStore) -> None:
    w = world(store, [CODE, CODE, CODE])
    w.provider.raises = SandboxError("no sandbox today")
    w.add()
    assert [w.run(), w.run()] == [
        RetryAfter(2.0, "sandbox_error"),
        RetryAfter(4.0, "sandbox_error"),
    ]
    assert w.run() == Done("finished")
    rec = store.get(TASK)
    assert rec is not None and rec.status is Status.ERROR and rec.result is not None
    assert rec.result.failure_class is FailureClass.SANDBOX_ERROR and rec.result.attempt == 3
    assert types(store).count(EventType.RETRYING) == 2


def test_cancel_mid_run(store: WorkerStore) -> None:
    w = world(store, [then(lambda: w.leases.cancel(TASK), CODE)])
    w.add()
    assert w.run() == Done("finished")
    rec = store.get(TASK)
    assert rec is not None and rec.status is Status.CANCELLED


def test_lease_vanished(store: WorkerStore) -> None:
    def lost() -> None:
        store.r.delete(store.keys.lease(TASK))
        w.leases.lose(TASK)

    w = world(store, [then(lost, CODE)])
    w.add()
    assert w.run() == RetryAfter(1.0, "lease_vanished")
    assert types(store) == [EventType.STARTED]
