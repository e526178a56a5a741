"""Submitting tasks: reserve tenant slots, write records + ``task.queued`` events, enqueue.

The order matters: a worker must find the record when its message arrives, so the records
are written before anything is enqueued; and a broker failure must not leave tasks
``queued`` forever, so those tasks are finished as ``error`` and the caller gets a 503.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import structlog

from agent.models import TaskSpec
from api.errors import ApiError
from api.fleet import EnqueueError
from store.api_store import TenantLimitError, queued_ms
from store.batches import BatchRecord
from store.records import TaskRecord

RETRY_AFTER_S = 5

log = structlog.get_logger("actfleet.api")


async def submit(
    state: Any, tenant: str, specs: Sequence[TaskSpec], batch: BatchRecord | None = None
) -> list[TaskRecord]:
    """Queue ``specs`` for ``tenant`` (as ``batch`` when given); return their records."""
    store = state.store
    try:
        await store.reserve(tenant, len(specs), state.settings.max_active_per_tenant)
    except TenantLimitError as e:
        raise ApiError(
            429,
            str(e),
            headers={"Retry-After": str(RETRY_AFTER_S)},
            active=e.active,
            limit=e.limit,
        ) from e
    records = store.new_records(tenant, specs, batch.id if batch else None)
    try:
        if batch is None:
            await store.write_tasks(records)
        else:
            await state.batches.create(batch, records)
    except BaseException:
        try:
            await _undo(store, tenant, records)
        except Exception as undo_error:  # Redis is down: the original error says more
            log.error("tasks.undo_failed", tenant=tenant, error=repr(undo_error))
        raise
    try:
        ids = [r.id for r in records]
        await state.enqueuer.enqueue(ids, queued_ms(records[0]) if records else 0)
    except EnqueueError as e:
        log.error("tasks.enqueue_failed", tenant=tenant, n=len(records), error=str(e))
        await store.fail_tasks(records, "the queue refused the task; submit it again")
        raise ApiError(503, "the queue is unavailable; nothing was queued: try again") from e
    state.metrics.tasks_submitted.inc(len(records))
    log.info("tasks.submitted", tenant=tenant, n=len(records), batch_id=batch.id if batch else None)
    return records


async def _undo(store: Any, tenant: str, records: list[TaskRecord]) -> None:
    """A write failed half way: finish what was written, give back the rest's slots."""
    pipe = store.client.pipeline(transaction=False)
    for rec in records:
        pipe.exists(store.keys.task(rec.id))
    written = [r for r, n in zip(records, await pipe.execute(), strict=True) if n]
    await store.fail_tasks(written, "the task could not be stored; submit it again")
    await store.release(tenant, len(records) - len(written))
