"""The heartbeat against a real redis-server: leases renewed, lost ones stopped, and no
false alarm for a task that ends while a renewal is in flight."""

from __future__ import annotations

from collections.abc import Iterable

import redis
from structlog.testing import capture_logs

from agent.events import Event, EventType
from agent.models import Result, Status, TaskSpec
from store.keys import Keys
from store.worker_store import Claim, LeaseState, WorkerStore
from tests.records import create, new_record
from workers.leases import Heartbeat, Lease


class EndsDuringRenewal(WorkerStore):
    """A store whose renewal round trip starts just after ``end`` ran: the runner's
    thread finishing or releasing the task between the heartbeat's snapshot of its
    leases and the renewal (the heartbeat thread and the task's thread race so)."""

    end = staticmethod(lambda: None)

    def renew(self, leases: Iterable[tuple[str, str, int]]) -> dict[str, LeaseState]:
        items = list(leases)
        self.end()
        return super().renew(items)


def claimed(store: WorkerStore) -> tuple[Claim, Lease]:
    rec = new_record(TaskSpec(prompt="2+2?"))
    create(store, rec)
    claim = store.claim(rec.id, "w1", max_attempts=3)
    assert isinstance(claim, Claim)
    return claim, Lease(rec.id, claim.owner, claim.attempt)


def test_a_task_that_finishes_during_a_renewal_is_not_a_lost_lease(redis_url: str) -> None:
    store = EndsDuringRenewal(redis.Redis.from_url(redis_url), Keys("t"))
    claim, lease = claimed(store)
    heartbeat = Heartbeat(store, "w1")
    heartbeat.add(lease)
    result = Result(Status.COMPLETED, answer="4", turns=1, attempt=1)
    finished = Event(EventType.FINISHED, turn=1, attempt=1, ts=0.0)
    store.end = lambda: store.finish(claim.record, claim.owner, result, finished)

    with capture_logs() as logs:
        heartbeat.beat()

    assert not lease.lost.is_set()
    assert [e for e in logs if e["event"] == "lease.lost"] == []


def test_a_task_released_during_a_renewal_is_not_a_lost_lease(redis_url: str) -> None:
    store = EndsDuringRenewal(redis.Redis.from_url(redis_url), Keys("t"))
    claim, lease = claimed(store)
    heartbeat = Heartbeat(store, "w1")
    heartbeat.add(lease)
    store.end = lambda: store.release(claim.record.id, claim.owner, reclaim_after_s=5)

    with capture_logs() as logs:
        heartbeat.beat()

    assert not lease.lost.is_set()
    assert [e for e in logs if e["event"] == "lease.lost"] == []


def test_a_lease_taken_by_another_attempt_is_lost_and_stopped(redis_url: str) -> None:
    store = EndsDuringRenewal(redis.Redis.from_url(redis_url), Keys("t"))
    claim, lease = claimed(store)
    heartbeat = Heartbeat(store, "w1")
    heartbeat.add(lease)
    # the lease expired and another worker took the task over
    store.end = lambda: (
        store.r.delete(store.keys.lease(claim.record.id)),
        store.claim(claim.record.id, "w2", max_attempts=3),
    )

    with capture_logs() as logs:
        heartbeat.beat()

    assert lease.lost.is_set()
    assert [e["task_id"] for e in logs if e["event"] == "lease.lost"] == [claim.record.id]
