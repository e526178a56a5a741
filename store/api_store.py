"""The API's side of the store: create, read, list and cancel tasks on an asyncio client.

Submitting starts here: ``reserve`` takes slots from the tenant's active-task budget
atomically (so two concurrent batches cannot both squeeze under the limit); then
``store.intake`` stages and commits the records, index entries, ``task.queued`` events and
broker messages, all or nothing.

Cancelling sets ``cancel_requested`` (a running worker polls it and stops) and, while the
task is still queued, finishes it at once with ``FINISH`` unfenced (owner ``""``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from agent.errors import ActfleetError
from agent.loop import finished_event
from agent.models import FailureClass, Result, Status, TaskSpec
from agent.text import text_of
from store.clients import aload_scripts, async_client
from store.intake import MATERIALIZE
from store.keys import DEFAULT_RETENTION, Keys, Retention
from store.records import RecordError, TaskRecord, new_task_id
from store.scripts import FINISH, finish_call

SOCKET_TIMEOUT_S = 5.0  # a command that gets no reply for this long fails
STREAM_READ_MARGIN_S = 10.0  # a blocking read's socket waits this much past its block time


def connect(url: str, *, block_s: float = 0.0) -> aioredis.Redis:
    """The API's client for ``url``.

    A command that meets a dead connection is sent once more, on a new one: after a
    Redis restart every pooled connection is dead, and without this the first request
    on each of them would fail. Only connection errors are retried, not timeouts (a
    command that timed out may have run). ``block_s``: the longest blocking read this
    client does (``XREAD BLOCK``); its socket timeout must outlast it, or redis-py
    aborts the read as a timeout while Redis is merely waiting for data. A cluster URL
    (``store.clients``) gives a cluster client.
    """
    return async_client(
        url,
        decode_responses=True,
        socket_timeout=max(SOCKET_TIMEOUT_S, block_s + STREAM_READ_MARGIN_S),
        socket_connect_timeout=SOCKET_TIMEOUT_S,
        retry=Retry(
            ExponentialBackoff(cap=0.5, base=0.05),
            retries=1,
            supported_errors=(RedisConnectionError,),
        ),
    )


# RESERVE_SLOTS: take n slots of a tenant's active-task budget, or none. A tenant's
# unfinished tasks are the slots it reserved minus its tasks that finished (counted per
# shard by FINISH, summed by the caller just before: a sum read a moment early is too
# small, so the check errs on the side of refusing, never lets a tenant past its limit).
# KEYS: 1 tenant reserved counter. ARGV: 1 n, 2 limit, 3 finished (the shards' sum).
# Returns {1, unfinished now} on success, {0, unfinished} when n more would pass the limit.
RESERVE_SLOTS = """
local cur = tonumber(redis.call('GET', KEYS[1]) or '0') - tonumber(ARGV[3])
local n = tonumber(ARGV[1])
if cur < 0 then cur = 0 end
if cur + n > tonumber(ARGV[2]) then return {0, cur} end
return {1, redis.call('INCRBY', KEYS[1], n) - tonumber(ARGV[3])}
"""

# RETURN_SLOTS: give back n reserved slots (never below zero). KEYS: 1 counter. ARGV: 1 n.
# Allowed while Redis is out of memory: it is how a refused submission gives its slots back.
RETURN_SLOTS = """#!lua flags=allow-oom
if redis.call('DECRBY', KEYS[1], ARGV[1]) < 0 then redis.call('SET', KEYS[1], 0) end
return 1
"""

# REQUEST_CANCEL: flag a non-terminal task for cancellation. KEYS: 1 task hash.
# Returns the status before the call, or false when there is no such task.
REQUEST_CANCEL = """
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return false end
if st == 'queued' or st == 'running' then redis.call('HSET', KEYS[1], 'cancel_requested', '1') end
return st
"""

CANCELLED_RESULT = Result(
    status=Status.CANCELLED,
    failure_class=FailureClass.CANCELLED,
    error="cancelled before it started",
)


class TenantLimitError(ActfleetError):
    """Accepting the tasks would take the tenant over its active-task limit."""

    def __init__(self, active: int, requested: int, limit: int) -> None:
        self.active, self.requested, self.limit = active, requested, limit
        super().__init__(
            f"tenant has {active} unfinished tasks; {requested} more would pass the limit of "
            f"{limit}: wait for some to finish"
        )


class AlreadyFinished(ActfleetError):
    """The task is already in a terminal status."""

    def __init__(self, status: str) -> None:
        self.status = status
        super().__init__(f"the task already finished with status {status!r}")


@dataclass(frozen=True, slots=True)
class Page:
    tasks: list[TaskRecord]
    next_cursor: int | None


class ApiStore:
    """Task operations for one tenant-aware API process. Cheap to build; no I/O until used."""

    def __init__(
        self, client: aioredis.Redis, keys: Keys, retention: Retention = DEFAULT_RETENTION
    ) -> None:
        self.client = client
        self.keys = keys
        self.retention = retention
        self._reserve_slots = client.register_script(RESERVE_SLOTS)
        self._return_slots = client.register_script(RETURN_SLOTS)
        self._request_cancel = client.register_script(REQUEST_CANCEL)
        self._finish = client.register_script(FINISH)
        self._materialize = client.register_script(MATERIALIZE)
        self._loaded = False  # are the pipelined scripts loaded (only a cluster needs it)

    # -- submit -------------------------------------------------------------------------

    async def reserve(self, tenant: str, n: int, limit: int) -> None:
        finished = await self._finished(tenant)
        ok, count = await self._reserve_slots(
            keys=[self.keys.tenant_active(tenant)], args=[n, limit, finished]
        )
        if not int(ok):
            raise TenantLimitError(int(count), n, limit)

    async def active(self, tenant: str) -> int:
        """The tenant's unfinished tasks (reserved slots less finished tasks)."""
        finished = await self._finished(tenant)
        reserved = await self.client.get(self.keys.tenant_active(tenant))
        return max(0, int(reserved or 0) - finished)

    async def _finished(self, tenant: str) -> int:
        pipe = self.client.pipeline(transaction=False)
        for shard in self.keys.shard_ids:
            pipe.get(self.keys.tenant_finished(tenant, shard))
        return sum(int(v or 0) for v in await pipe.execute())

    async def release(self, tenant: str, n: int) -> None:
        if n > 0:
            await self._return_slots(keys=[self.keys.tenant_active(tenant)], args=[n])

    def new_records(
        self, tenant: str, specs: Sequence[TaskSpec], batch_id: str | None = None
    ) -> list[TaskRecord]:
        now = time.time()
        return [
            TaskRecord(id=new_task_id(), tenant=tenant, spec=s, batch_id=batch_id, created_at=now)
            for s in specs
        ]

    # -- read -----------------------------------------------------------------------------

    async def get_task(self, tenant: str, task_id: str) -> TaskRecord | None:
        """The task if it exists and belongs to ``tenant``; None otherwise (never tell which)."""
        h = await self.client.hgetall(self.keys.task(task_id))
        if not h:
            return None
        rec = TaskRecord.from_hash(h)
        return rec if rec.tenant == tenant else None

    async def task_status(self, tenant: str, task_id: str) -> Status | None:
        owner, status = await self.client.hmget(self.keys.task(task_id), ["tenant", "status"])
        if owner is None or text_of(owner) != tenant:
            return None
        return Status(text_of(status))

    async def list_tasks(
        self,
        tenant: str,
        *,
        status: Status | None = None,
        limit: int = 50,
        cursor: int = 0,
        scan_max: int = 5000,
    ) -> Page:
        """Newest first. ``cursor`` is an offset into the tenant's index; with a status
        filter at most ``scan_max`` index entries are examined per call, so a page may be
        short while ``next_cursor`` is still set."""
        out: list[TaskRecord] = []
        index = self.keys.tenant_tasks(tenant)
        pos = cursor
        scanned = 0
        while len(out) < limit and scanned < scan_max:
            step = limit if status is None else min(500, max(limit * 4, 100))
            ids = [text_of(i) for i in await self.client.zrevrange(index, pos, pos + step - 1)]
            if not ids:
                return Page(out, None)
            pipe = self.client.pipeline(transaction=False)
            for task_id in ids:
                pipe.hgetall(self.keys.task(task_id))
            gone = []
            for task_id, h in zip(ids, await pipe.execute(), strict=True):
                pos += 1
                scanned += 1
                if not h:
                    gone.append(task_id)  # its record expired: drop the stale index entry
                    continue
                try:
                    rec = TaskRecord.from_hash(h)
                except RecordError:
                    continue
                if status is None or rec.status is status:
                    out.append(rec)
                    if len(out) == limit:
                        break
            if gone:
                await self.client.zrem(index, *gone)
                pos -= len(gone)
        more = await self.client.zcard(index) > pos
        return Page(out, pos if more else None)

    # -- cancel ---------------------------------------------------------------------------

    async def cancel_task(self, tenant: str, task_id: str) -> TaskRecord | None:
        """Cancel one task. None if it is not the tenant's; ``AlreadyFinished`` if terminal."""
        rec = await self.get_task(tenant, task_id)
        if rec is None:
            return None
        if rec.status.terminal:
            raise AlreadyFinished(rec.status.value)
        before = await self._request_cancel(keys=[self.keys.task(task_id)])
        if before is not None and text_of(before) == Status.QUEUED:
            await self.finish_cancelled(rec.id, rec.tenant, rec.batch_id, rec.attempt)
        return await self.get_task(tenant, task_id)

    async def _pipelined_scripts(self) -> None:
        """Scripts sent in a pipeline must be loaded on a cluster's masters first."""
        if not self._loaded:
            await aload_scripts(self.client, (REQUEST_CANCEL, FINISH, MATERIALIZE))
            self._loaded = True

    async def request_cancel_many(self, task_ids: Sequence[str]) -> list[str | None]:
        """Flag every non-terminal task; return each task's status before the call."""
        await self._pipelined_scripts()
        pipe = self.client.pipeline(transaction=False)
        for task_id in task_ids:
            await self._request_cancel(keys=[self.keys.task(task_id)], client=pipe)
        return [None if st is None else text_of(st) for st in await pipe.execute()]

    async def finish_cancelled(
        self, task_id: str, tenant: str, batch_id: str | None, attempt: int
    ) -> bool:
        """Finish a queued task as cancelled; False if a worker took it first (the worker
        then sees ``cancel_requested`` and stops)."""
        keys, args = self.finish_cancelled_call(task_id, tenant, batch_id, attempt)
        await self._pipelined_scripts()
        pipe = self.client.pipeline(transaction=False)
        await self._materialize(
            keys=[self.keys.task(task_id), self.keys.events(task_id)], client=pipe
        )
        await self._finish(keys=keys, args=args, client=pipe)
        out = (await pipe.execute())[1]
        return not isinstance(out, int)

    async def finish_cancelled_many(self, tasks: Sequence[tuple[str, str, str | None, int]]) -> int:
        await self._pipelined_scripts()
        pipe = self.client.pipeline(transaction=False)
        for t in tasks:
            keys, args = self.finish_cancelled_call(*t)
            await self._materialize(
                keys=[self.keys.task(t[0]), self.keys.events(t[0])], client=pipe
            )
            await self._finish(keys=keys, args=args, client=pipe)
        return sum(1 for out in (await pipe.execute())[1::2] if not isinstance(out, int))

    def finish_cancelled_call(
        self, task_id: str, tenant: str, batch_id: str | None, attempt: int
    ) -> tuple[list[str], list[Any]]:
        """The KEYS and ARGV of an unfenced FINISH to ``cancelled`` (see store.scripts)."""
        return self._finish_queued_call(
            task_id, tenant, batch_id, replace(CANCELLED_RESULT, attempt=attempt)
        )

    def _finish_queued_call(
        self, task_id: str, tenant: str, batch_id: str | None, result: Result
    ) -> tuple[list[str], list[Any]]:
        now = time.time()
        return finish_call(
            self.keys,
            task_id,
            tenant,
            batch_id,
            owner="",  # unfenced: FINISH allows it only while the task is still queued
            result=result,
            event=finished_event(result, now),
            finished_at=now,
            retention=self.retention,
        )
