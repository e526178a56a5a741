"""Submitting tasks: reserve tenant slots, then stage and commit the submission, all or
nothing (``store.intake``).

Nothing of a submission is visible or runnable before its commit, which is one atomic
script: a failure before it (Redis full, gone, a broken connection) leaves nothing queued,
the staged keys are deleted (or expire by themselves when Redis cannot be reached) and the
slots are given back. A Redis that is full answers 503 with ``Retry-After`` (as does one
near its limit, checked before any work: ``api.memory``).
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import Any

import structlog
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from agent.models import TaskSpec
from api.errors import ApiError
from store.api_store import TenantLimitError
from store.batches import BatchRecord
from store.intake import IntakeExpired, Submission, queued_ms
from store.records import TaskRecord

RETRY_AFTER_S = 5

log = structlog.get_logger("actfleet.api")


async def submit(
    state: Any, tenant: str, specs: Sequence[TaskSpec], batch: BatchRecord | None = None
) -> list[TaskRecord]:
    """Queue ``specs`` for ``tenant`` (as ``batch`` when given); return their records."""
    await state.memory.check()
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
    keys = state.keys
    if batch is None:
        intake_id = "i" + secrets.token_hex(12)
        sub = Submission(intake_id, records, keys.intake_ids(intake_id))
    else:
        sub = Submission(
            batch.id,
            records,
            keys.batch_tasks(batch.id),
            ids_ttl_s=store.retention.batch_s,
            batch=(keys.batch(batch.id), batch.to_hash()),
        )
    pushed_ms = queued_ms(records[0])
    try:
        await state.intake.stage(sub, pushed_ms)
    except BaseException as e:
        await _undo(state, tenant, sub)
        _refuse(state, tenant, sub, e)
        raise
    try:
        await state.intake.commit(sub, pushed_ms)
    except BaseException as e:
        # A commit whose reply was lost may have run: undo only one known not to have.
        done = await state.intake.committed(sub)
        if done is not True:
            if done is False:
                await _undo(state, tenant, sub)
            _refuse(state, tenant, sub, e)
            raise
        log.warning("tasks.commit_reply_lost", tenant=tenant, n=len(records), error=repr(e))
    state.metrics.tasks_submitted.inc(len(records))
    log.info("tasks.submitted", tenant=tenant, n=len(records), batch_id=batch.id if batch else None)
    return records


def _refuse(state: Any, tenant: str, sub: Submission, e: BaseException) -> None:
    """Raise what the client gets for a submission that failed before its commit; return
    (for the caller to re-raise ``e``) when that is ``e`` itself: a cancellation, a bug, or
    an unreachable Redis (the app's handler answers 503)."""
    if not isinstance(e, RedisError | IntakeExpired):
        return
    log.error("tasks.submit_failed", tenant=tenant, n=len(sub.records), error=repr(e))
    if isinstance(e, RedisConnectionError | RedisTimeoutError):
        return
    if isinstance(e, OutOfMemoryError):
        state.memory.saw_full()
        raise ApiError(
            503,
            "the store (Redis) is full; nothing was queued: try again later",
            headers={"Retry-After": str(state.memory.retry_after_s)},
        ) from e
    raise ApiError(
        503,
        "the store (Redis) refused the tasks; nothing was queued: try again",
        headers={"Retry-After": str(RETRY_AFTER_S)},
    ) from e


async def _undo(state: Any, tenant: str, sub: Submission) -> None:
    """Nothing was committed: delete what was staged and give the slots back. Where Redis
    cannot be reached the staged keys expire by themselves (``INTAKE_TTL_S``)."""
    try:
        await state.intake.discard(sub)
        await state.store.release(tenant, len(sub.records))
    except Exception as undo_error:  # Redis is down: the original error says more
        log.error("tasks.undo_failed", tenant=tenant, error=repr(undo_error))
