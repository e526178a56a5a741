"""Queueing a submission (one task or a whole batch) all or nothing.

Two steps, so that no failure half way leaves part of a submission visible or running:

1. ``stage``: the records (each with its ``task.queued`` event, which starts its stream
   only when the task does: ``MATERIALIZE``) are written, in chunks (one Lua call
   each), *with a TTL* (``INTAKE_TTL_S``), together with the ids (in input order: a
   batch's ``{p}:batch:{id}:tasks`` list) and the broker messages (``{p}:intake:{id}:
   messages``), also with that TTL. Nothing refers to the records yet: no index entry, no
   batch record, no message on the queue, so no worker, sweeper or listing can see them,
   and if the API dies here they expire on their own.
2. ``commit``: one Lua script, so atomic, makes it all real at once: it persists the records,
   adds the ids to the tenant's index and the queued index, moves the staged
   messages onto the broker queue in order, and writes the batch record. Scripts declare
   the ``#!lua`` shebang, so Redis refuses one that writes while it is over ``maxmemory``
   before it starts, never half way.

A failure during ``stage`` (Redis full, gone) is undone by ``discard`` where Redis still
answers, and by the TTL where it does not. The broker is the store's own Redis here; that
is what lets the commit include the messages.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from agent.errors import ActfleetError
from agent.events import Event, EventType
from store.celery_app import run_task_message
from store.keys import TASK_QUEUE, Keys
from store.records import TaskRecord

INTAKE_TTL_S = 3600  # staged keys of a submission that never committed vanish after this
STAGE_CHUNK = 1000  # tasks per staging call
MOVE_CHUNK = 1000  # ids or messages the commit moves per Redis call (Lua's unpack limit)

# STAGE: write one chunk of a submission's tasks, not yet visible.
# KEYS: 1 ids list, 2 staged messages list, then per task: its record hash
# ARGV: 1 ttl_s, then per task: the record as a JSON array [field, value, ...] (with its
#       task.queued event in "queued_event", see MATERIALIZE), its id, its broker message
# Returns: the number of ids staged so far.
STAGE = """#!lua
local ttl = ARGV[1]
local ids, messages = {}, {}
for i = 1, #KEYS - 2 do
  local task, a = KEYS[2 + i], 3 * i - 1
  redis.call('HSET', task, unpack(cjson.decode(ARGV[a])))
  redis.call('EXPIRE', task, ttl)
  ids[i] = ARGV[a + 1]
  messages[i] = ARGV[a + 2]
end
redis.call('RPUSH', KEYS[2], unpack(messages))
redis.call('EXPIRE', KEYS[2], ttl)
local total = redis.call('RPUSH', KEYS[1], unpack(ids))
redis.call('EXPIRE', KEYS[1], ttl)
return total
"""

# COMMIT: make a staged submission real, atomically.
# KEYS: 1 ids list, 2 staged messages list, 3 broker queue, 4 queued index, 5 tenant index,
#       6 batch hash (a batch) or the ids list again (single tasks), then every task's
#       record hash
# ARGV: 1 tasks expected, 2 queued-index score (push time, unix ms), 3 tenant-index score
#       (created_at), 4 ids-list ttl_s (0: delete it), 5 move chunk, then the batch hash
#       as [field, value, ...] (none for single tasks)
# Returns: 1 committed; 0 the staged keys are incomplete (expired): nothing was written.
COMMIT = """#!lua
local n = tonumber(ARGV[1])
if redis.call('LLEN', KEYS[1]) ~= n or redis.call('LLEN', KEYS[2]) ~= n then return 0 end
for i = 7, #KEYS do redis.call('PERSIST', KEYS[i]) end
local step = tonumber(ARGV[5])
for s = 0, n - 1, step do
  local ids = redis.call('LRANGE', KEYS[1], s, s + step - 1)
  local queued, tenant = {}, {}
  for j, id in ipairs(ids) do
    queued[2 * j - 1], queued[2 * j] = ARGV[2], id
    tenant[2 * j - 1], tenant[2 * j] = ARGV[3], id
  end
  redis.call('ZADD', KEYS[4], unpack(queued))
  redis.call('ZADD', KEYS[5], unpack(tenant))
  redis.call('LPUSH', KEYS[3], unpack(redis.call('LRANGE', KEYS[2], s, s + step - 1)))
end
redis.call('DEL', KEYS[2])
if #ARGV > 5 then
  redis.call('HSET', KEYS[6], unpack(ARGV, 6))
  redis.call('EXPIRE', KEYS[6], ARGV[4])
end
if tonumber(ARGV[4]) > 0 then redis.call('EXPIRE', KEYS[1], ARGV[4]) else redis.call('DEL', KEYS[1]) end
return 1
"""

# MATERIALIZE: start a task's event stream with its task.queued event, kept in the record
# (field "queued_event") until then: a stream costs Redis some 4 KB from its first entry
# (its first node is allocated whole), so a waiting task has none. The entry gets id 0-1,
# the lowest there is, which the API's SSE also gives the event while it is only in the
# record: a client sees the same event, with the same id, before and after. Run it before
# the first write to the stream (the claim, the API's cancel of a queued task);
# idempotent.
# KEYS: 1 task hash, 2 events stream. Returns 1 if it wrote the entry, else 0.
MATERIALIZE = """
local e = redis.call('HGET', KEYS[1], 'queued_event')
if not e then return 0 end
local wrote = 0
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('XADD', KEYS[2], '0-1', 'e', e)
  wrote = 1
end
redis.call('HDEL', KEYS[1], 'queued_event')
return wrote
"""
QUEUED_ID = "0-1"  # the stream id of every task's task.queued event
QUEUED_FIELD = "queued_event"


class IntakeExpired(ActfleetError):
    """The staged keys of a submission were gone by its commit; nothing was queued."""


@dataclass(frozen=True, slots=True)
class Submission:
    """What one submission stages and commits: ``ids_key`` holds its ids in order (a
    batch's task list, or a temporary list), ``batch`` is the batch hash (key, fields)."""

    intake_id: str
    records: Sequence[TaskRecord]
    ids_key: str
    ids_ttl_s: int = 0  # after the commit: 0 deletes the list (single tasks)
    batch: tuple[str, dict[str, str]] | None = None


class Intake:
    """Stages and commits submissions on the API's asyncio client. No I/O until used."""

    def __init__(self, client: aioredis.Redis, keys: Keys) -> None:
        self.client = client
        self.keys = keys
        self._stage = client.register_script(STAGE)
        self._commit = client.register_script(COMMIT)

    async def stage(self, sub: Submission, queued_ms: int) -> None:
        """Write every record, id and message of ``sub``, invisible and expiring.

        Chunks go out in order, one at a time, but the next chunk is encoded while Redis
        runs the last one."""
        messages_key = self.keys.intake_messages(sub.intake_id)
        pending: asyncio.Future[Any] | None = None
        try:
            for start in range(0, len(sub.records), STAGE_CHUNK):
                names, args = self._chunk(sub, messages_key, start, queued_ms)
                if pending is not None:
                    await pending
                pending = asyncio.ensure_future(self._stage(keys=names, args=args))
                await asyncio.sleep(0)  # let it reach the socket before the next encoding
            if pending is not None:
                await pending
        finally:
            if pending is not None and not pending.done():
                pending.cancel()

    def _chunk(
        self, sub: Submission, messages_key: str, start: int, queued_ms: int
    ) -> tuple[list[str], list[Any]]:
        k = self.keys
        names = [sub.ids_key, messages_key]
        args: list[Any] = [INTAKE_TTL_S]
        for rec in sub.records[start : start + STAGE_CHUNK]:
            names.append(k.task(rec.id))
            fields = rec.to_hash()
            fields[QUEUED_FIELD] = orjson.dumps(queued_event(rec).to_dict()).decode()
            args += [
                orjson.dumps([x for kv in fields.items() for x in kv]),
                rec.id,
                run_task_message(rec.id, queued_ms),
            ]
        return names, args

    async def commit(self, sub: Submission, queued_ms: int) -> None:
        """Make ``sub`` visible and runnable at once; ``IntakeExpired`` if it cannot."""
        k = self.keys
        first = sub.records[0]
        names = [
            sub.ids_key,
            k.intake_messages(sub.intake_id),
            TASK_QUEUE,
            k.queued,
            k.tenant_tasks(first.tenant),
            sub.batch[0] if sub.batch else sub.ids_key,
        ]
        names += [k.task(rec.id) for rec in sub.records]
        args: list[str | int] = [
            len(sub.records),
            queued_ms,
            repr(first.created_at),
            sub.ids_ttl_s,
            MOVE_CHUNK,
        ]
        if sub.batch:
            args += [x for kv in sub.batch[1].items() for x in kv]
        if not int(await self._commit(keys=names, args=args)):
            raise IntakeExpired(f"the staged tasks of {sub.intake_id} expired before commit")

    async def committed(self, sub: Submission) -> bool | None:
        """Did ``sub`` commit (after a commit call whose reply was lost)? None when Redis
        cannot tell now. A staged submission still has its messages list; a committed one
        has not, and its records have lost their TTL."""
        try:
            pipe = self.client.pipeline(transaction=False)
            pipe.exists(self.keys.intake_messages(sub.intake_id))
            pipe.ttl(self.keys.task(sub.records[0].id))
            staged, ttl = await pipe.execute()
        except RedisError:
            return None
        return not staged and int(ttl) == -1

    async def discard(self, sub: Submission) -> None:
        """Delete whatever ``stage`` wrote of ``sub`` (DEL works even when Redis is full)."""
        k = self.keys
        names = [sub.ids_key, k.intake_messages(sub.intake_id)]
        names += [k.task(rec.id) for rec in sub.records]
        pipe = self.client.pipeline(transaction=False)
        for start in range(0, len(names), MOVE_CHUNK):
            pipe.delete(*names[start : start + MOVE_CHUNK])
        await pipe.execute()


def queued_ms(rec: TaskRecord) -> int:
    """A new task's score in the queued index, and the push time its message carries."""
    return int(rec.created_at * 1000)


def queued_event(rec: TaskRecord) -> Event:
    data: dict[str, Any] = {"task_id": rec.id}
    if rec.spec.custom_id:
        data["custom_id"] = rec.spec.custom_id
    if rec.batch_id:
        data["batch_id"] = rec.batch_id
    return Event(EventType.QUEUED, turn=0, attempt=0, ts=rec.created_at, data=data)
