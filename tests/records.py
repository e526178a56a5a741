"""Task records made as the API makes them, for tests that drive the worker's store directly."""

from __future__ import annotations

from typing import Any

from agent.models import TaskSpec
from store.records import TaskRecord, new_task_id
from store.worker_store import WorkerStore


def new_record(spec: TaskSpec, tenant: str = "t_test", **kw: Any) -> TaskRecord:
    """A queued record of ``spec`` for ``tenant``; ``kw`` sets any other field (``id``, ...)."""
    return TaskRecord(id=kw.pop("id", None) or new_task_id(), tenant=tenant, spec=spec, **kw)


def create(store: WorkerStore, record: TaskRecord) -> None:
    """Store a new queued record with its tenant and queued index entries and its batch's
    counts, as the API's submission does (``store.intake``), on the worker store's client
    (one Redis or a cluster: no transaction across shards)."""
    k = store.keys
    shard = k.shard(record.id)
    pipe = store.r.pipeline(transaction=False)
    pipe.hset(k.task(record.id), mapping=dict(record.to_hash()))  # type: ignore[arg-type]
    pipe.zadd(k.tenant_tasks(record.tenant), {record.id: record.created_at})
    pipe.zadd(k.queued(shard), {record.id: int(record.created_at * 1000)})
    pipe.incr(k.tenant_active(record.tenant))
    if record.batch_id:
        counts = k.batch_counts(record.batch_id, shard)
        pipe.rpush(k.batch_tasks(record.batch_id), record.id)
        pipe.hincrby(counts, record.status.value, 1)
        pipe.hincrby(counts, "total", 1)
    pipe.execute()
