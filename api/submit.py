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
import time
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
from store.intake import IntakeExpired, Submission
from store.records import TaskRecord, new_task_id

RETRY_AFTER_S = 5

log = structlog.get_logger("actfleet.api")


async def submit(
    state: Any, tenant: str, specs: Sequence[TaskSpec], batch: BatchRecord | None = None
) -> list[TaskRecord]:
    """Queue ``specs`` for ``tenant`` (as ``batch`` when given); return their records."""
    return await Submitting(state, tenant, batch.id if batch else None).commit(specs, batch)


class Submitting:
    """One submission on its way in: its tasks may be staged as they come (``add``: a
    batch's, while the rest of its body is still being read and checked), then all are
    queued at once (``commit``), or what was staged is taken back (``abandon``: a later
    line was bad, the client went away).

    Staging ahead changes nothing a client can see: the staged tasks are invisible and
    expire by themselves (``store.intake``); a submission refused at its commit (Redis
    full, the tenant's limit) is refused as it would have been without, in the same
    order of checks. ``add`` stages only while Redis is not near full at the first add;
    otherwise everything waits for ``commit``, which refuses it."""

    def __init__(self, state: Any, tenant: str, batch_id: str | None = None) -> None:
        self.state = state
        self.tenant = tenant
        self.batch_id = batch_id
        self.created_at = time.time()
        self.intake_id = batch_id or "i" + secrets.token_hex(12)
        keys = state.keys
        self.ids_key = keys.batch_tasks(batch_id) if batch_id else keys.intake_ids(self.intake_id)
        self.pushed_ms = int(self.created_at * 1000)  # store.intake.queued_ms of each record
        self.staging = state.intake.staging(self.intake_id, self.ids_key, self.pushed_ms, batch_id)
        self._ahead: bool | None = None  # may tasks be staged before the commit?
        self._open = True  # nothing committed or taken back yet
        self._error: Exception | None = None  # what staging ahead met

    def _records(self, specs: Sequence[TaskSpec]) -> list[TaskRecord]:
        tenant, batch_id, now = self.tenant, self.batch_id, self.created_at
        return [
            TaskRecord(id=new_task_id(), tenant=tenant, spec=s, batch_id=batch_id, created_at=now)
            for s in specs
        ]

    def _submission(self, batch: BatchRecord | None) -> Submission:
        records = self.staging.records
        if batch is None:
            return Submission(self.intake_id, records, self.ids_key)
        return Submission(
            batch.id,
            records,
            self.ids_key,
            ids_ttl_s=self.state.store.retention.batch_s,
            batch=(self.state.keys.batch(batch.id), batch.to_hash()),
        )

    async def add(self, specs: Sequence[TaskSpec]) -> None:
        """Stage ``specs`` (the next of the submission's, in order) now, if Redis has room."""
        if self._ahead is None:
            try:
                await self.state.memory.check()
                self._ahead = True
            except ApiError:  # commit refuses it, after the body's own errors
                self._ahead = False
        if self._ahead:
            try:
                await self.staging.add(self._records(specs))
            except Exception as e:  # refused at the commit, after the body's own errors
                self._ahead = False
                self._error = e
                await self.staging.close()

    async def commit(
        self, specs: Sequence[TaskSpec], batch: BatchRecord | None = None
    ) -> list[TaskRecord]:
        """Queue all of ``specs`` (those ``add``ed first), or none; their records."""
        state, tenant = self.state, self.tenant
        try:
            await state.memory.check()
            await _reserve(state, tenant, len(specs))
        except BaseException:
            await self.abandon()
            raise
        self._open = False
        try:
            if self._error is not None:
                raise self._error
            await self.staging.add(self._records(specs[len(self.staging.records) :]))
            await self.staging.done()
        except BaseException as e:
            await self.staging.close()
            sub = self._submission(batch)
            await _undo(state, tenant, sub, len(specs))
            _refuse(state, tenant, sub, e)
            raise
        await self.staging.close()
        sub = self._submission(batch)
        try:
            await state.intake.commit(sub, self.pushed_ms)
        except BaseException as e:
            # A commit whose reply was lost may have run: undo only one known not to have.
            done = await state.intake.committed(sub)
            if done is not True:
                if done is False:
                    await _undo(state, tenant, sub, len(specs))
                _refuse(state, tenant, sub, e)
                raise
            log.warning("tasks.commit_reply_lost", tenant=tenant, n=len(specs), error=repr(e))
        state.metrics.tasks_submitted.inc(len(specs))
        log.info("tasks.submitted", tenant=tenant, n=len(specs), batch_id=self.batch_id)
        return list(sub.records)

    async def abandon(self) -> None:
        """Take back what was staged, if nothing was committed (idempotent). Where Redis
        cannot be reached the staged keys expire by themselves (``INTAKE_TTL_S``)."""
        if not self._open:
            return
        self._open = False
        await self.staging.close()
        if not self.staging.records:
            return
        try:
            await self.state.intake.discard(self._submission(None))
        except Exception as e:  # Redis is down: the original error says more
            log.error("tasks.undo_failed", tenant=self.tenant, error=repr(e))


async def _reserve(state: Any, tenant: str, n: int) -> None:
    try:
        await state.store.reserve(tenant, n, state.settings.max_active_per_tenant)
    except TenantLimitError as e:
        raise ApiError(
            429,
            str(e),
            headers={"Retry-After": str(RETRY_AFTER_S)},
            active=e.active,
            limit=e.limit,
        ) from e


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


async def _undo(state: Any, tenant: str, sub: Submission, reserved: int) -> None:
    """Nothing was committed: delete what was staged and give the slots back. Where Redis
    cannot be reached the staged keys expire by themselves (``INTAKE_TTL_S``)."""
    try:
        await state.intake.discard(sub)
        await state.store.release(tenant, reserved)
    except Exception as undo_error:  # Redis is down: the original error says more
        log.error("tasks.undo_failed", tenant=tenant, error=repr(undo_error))
