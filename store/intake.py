"""Queueing a submission (one task or a whole batch) all or nothing.

Two steps, so that no failure half way leaves part of a submission visible or running:

1. ``stage``: the records (each with its ``task.queued`` event, which starts its stream
   only when the task does: ``MATERIALIZE``) are written, in chunks (one Lua call
   each, pipelined: ``store.staging``; a batch's first chunks while the rest of its body is
   still being read), *with a TTL* (``INTAKE_TTL_S``), together with the ids (in input order: a
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
answers, and by the TTL where it does not.

Keys are shard-tagged (``store.keys``): a submission's records, the queued indexes and its
batch's counters fall in many shards. On one Redis whose broker queue is on that Redis
too, the commit above is still one script over every key (a single Redis does not enforce
slots; every key is passed in KEYS). On a Redis Cluster, or with the queue on its own Redis
(``ACTFLEET_BROKER_URL``), no one script can reach them all, so ``commit`` runs one script
per shard (each within its shard's slot: the records' PERSIST, the shard's queued index
and batch counters), then writes the tenant index, the batch record and, last, pushes the
broker messages in one MULTI/EXEC on the broker. A failure reported on the way undoes the
shards already committed (``UNCOMMIT_SHARD``) and everything after them, so nothing is
visible or runs; deploy/README.md says what holds if the API itself dies half way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from agent.errors import ActfleetError
from store.celery_app import BULK_CHUNK, RunTaskMessages
from store.clients import aload_scripts, is_cluster
from store.keys import DEFAULT_RETENTION, TASK_QUEUE, Keys, Retention
from store.records import TaskRecord
from store.staging import (
    INTAKE_TTL_S,
    STAGE_RECORDS,
    Staging,
    by_shard,
    records_json,
)

MOVE_CHUNK = 1000  # ids or messages the commit moves per Redis call (Lua's unpack limit)

# COMMIT: make a staged submission real, atomically (one Redis, broker on it).
# KEYS: 1 ids list, 2 staged messages list, 3 broker queue, 4 tenant index, 5 batch hash (a
#       batch) or the ids list again (single tasks), then per shard the submission's tasks
#       fall in (ARGV 8 of them): its queued index and its batch counts hash (the queued
#       index again for single tasks), then every task's record hash, shard by shard in
#       that order
# ARGV: 1 tasks expected, 2 queued-index score (push time, unix ms), 3 tenant-index score
#       (created_at), 4 ids-list ttl_s (0: delete it), 5 move chunk, 6 batch keys' ttl_s,
#       7 "1" when the batch has a webhook, 8 shards m, then per shard: its number of
#       tasks and where a task's id starts in its key (store.keys: {p}:{s}:task:{id}),
#       then the batch hash as [field, value, ...] (none for single tasks)
# The staged messages are in queue order already (STAGE LPUSHes them): onto an empty
# queue they move whole, by RENAME (O(1), and a line in the AOF instead of every message
# again); onto a busy one, a chunk at a time from the first task on.
# Python groups the records by shard, so the loop over them does no more than it must
# (a PERSIST, a substring, two table slots): it runs once per task while nothing else can.
# Returns: 1 committed; 0 the staged keys are incomplete (expired): nothing was written.
COMMIT = """#!lua
local n = tonumber(ARGV[1])
if redis.call('LLEN', KEYS[1]) ~= n or redis.call('LLEN', KEYS[2]) ~= n then return 0 end
local m = tonumber(ARGV[8])
local batch = #ARGV > 8 + 2 * m
local qscore, tscore, step = ARGV[2], ARGV[3], tonumber(ARGV[5])
local last = 5 + 2 * m  -- the key before the shard's first record
for j = 1, m do
  local queued, counts = KEYS[4 + 2 * j], KEYS[5 + 2 * j]
  local count, at = tonumber(ARGV[7 + 2 * j]), tonumber(ARGV[8 + 2 * j])
  if batch then
    redis.call('HINCRBY', counts, 'queued', count)
    redis.call('HINCRBY', counts, 'total', count)
    if ARGV[7] == '1' then redis.call('HSET', counts, 'webhook', '1') end
    redis.call('EXPIRE', counts, ARGV[6])
  end
  for s = last + 1, last + count, step do
    local q, t, c = {}, {}, 0
    for i = s, math.min(s + step - 1, last + count) do
      local key = KEYS[i]
      redis.call('PERSIST', key)
      local id = string.sub(key, at)
      q[c + 1] = qscore; q[c + 2] = id
      t[c + 1] = tscore; t[c + 2] = id
      c = c + 2
    end
    redis.call('ZADD', queued, unpack(q))
    redis.call('ZADD', KEYS[4], unpack(t))
  end
  last = last + count
end
if redis.call('EXISTS', KEYS[3]) == 0 then
  redis.call('RENAME', KEYS[2], KEYS[3])
  redis.call('PERSIST', KEYS[3])
else
  for s = n - 1, 0, -step do
    local chunk = redis.call('LRANGE', KEYS[2], math.max(s - step + 1, 0), s)
    local first, c = {}, #chunk
    for i = 1, c do first[i] = chunk[c + 1 - i] end
    redis.call('LPUSH', KEYS[3], unpack(first))
  end
  redis.call('DEL', KEYS[2])
end
if batch then
  redis.call('HSET', KEYS[5], unpack(ARGV, 9 + 2 * m))
  redis.call('EXPIRE', KEYS[5], ARGV[6])
end
if tonumber(ARGV[4]) > 0 then redis.call('EXPIRE', KEYS[1], ARGV[4]) else redis.call('DEL', KEYS[1]) end
return 1
"""

# COMMIT_SHARD: COMMIT's part in one shard (every key in the shard's slot).
# KEYS: 1 the shard's queued index, 2 the batch's counts hash in the shard (or the queued
#       index again for single tasks), then the shard's task records
# ARGV: 1 queued-index score, 2 batch keys' ttl_s, 3 "1" a batch, 4 "1" it has a webhook
# Returns: 1 committed; 0 a staged record was gone (expired): nothing was written.
COMMIT_SHARD = """#!lua
for i = 3, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 0 then return 0 end
end
local q = {}
for i = 3, #KEYS do
  redis.call('PERSIST', KEYS[i])
  q[#q + 1] = ARGV[1]
  q[#q + 1] = string.match(KEYS[i], ':task:(.+)$')
end
redis.call('ZADD', KEYS[1], unpack(q))
if ARGV[3] == '1' then
  redis.call('HINCRBY', KEYS[2], 'queued', #KEYS - 2)
  redis.call('HINCRBY', KEYS[2], 'total', #KEYS - 2)
  if ARGV[4] == '1' then redis.call('HSET', KEYS[2], 'webhook', '1') end
  redis.call('EXPIRE', KEYS[2], ARGV[2])
end
return 1
"""

# UNCOMMIT_SHARD: undo COMMIT_SHARD (and STAGE_RECORDS): the records go, and their entries
# in the shard's queued index and batch counts. Allowed while Redis is out of memory: it
# is how a refused submission takes back what it wrote. A batch's counts in the shard are
# its own (a batch id is new), so they go whole.
# KEYS: as COMMIT_SHARD's. ARGV: 1 "1" a batch. Returns 1.
UNCOMMIT_SHARD = """#!lua flags=allow-oom
local ids = {}
for i = 3, #KEYS do ids[#ids + 1] = string.match(KEYS[i], ':task:(.+)$') end
redis.call('ZREM', KEYS[1], unpack(ids))
if ARGV[1] == '1' then redis.call('DEL', KEYS[2]) end
redis.call('DEL', unpack(KEYS, 3))
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
    """Stages and commits submissions on the API's asyncio client (``broker``: the task
    queue's Redis, default the same). No I/O until used."""

    def __init__(
        self,
        client: aioredis.Redis,
        keys: Keys,
        *,
        broker: aioredis.Redis | None = None,
        retention: Retention = DEFAULT_RETENTION,
    ) -> None:
        self.client = client
        self.keys = keys
        self.broker = broker or client
        self.retention = retention
        # one atomic script needs every key, the queue's too, on one Redis
        self.per_shard = is_cluster(client) or self.broker is not client
        self._commit = client.register_script(COMMIT)
        self._stage_records = client.register_script(STAGE_RECORDS)
        self._commit_shard = client.register_script(COMMIT_SHARD)
        self._uncommit_shard = client.register_script(UNCOMMIT_SHARD)
        self._loaded = not is_cluster(client)

    def staging(
        self, intake_id: str, ids_key: str, queued_ms: int, batch_id: str | None = None
    ) -> Staging:
        """A submission to stage chunk by chunk (``Staging``); its tasks are all of
        ``batch_id`` (None: not of a batch)."""
        return Staging(self, intake_id, ids_key, queued_ms, batch_id)

    async def stage(self, sub: Submission, queued_ms: int) -> None:
        """Write every record, id and message of ``sub``, invisible and expiring."""
        staging = self.staging(sub.intake_id, sub.ids_key, queued_ms, sub.records[0].batch_id)
        try:
            await staging.add(sub.records)
            await staging.done()
        finally:
            await staging.close()

    async def commit(self, sub: Submission, queued_ms: int) -> None:
        """Make ``sub`` visible and runnable at once; ``IntakeExpired`` if it cannot."""
        if self.per_shard:
            await self._commit_per_shard(sub, queued_ms)
            return
        k = self.keys
        first = sub.records[0]
        shards = by_shard(k, sub.records)
        names = [
            sub.ids_key,
            k.intake_messages(sub.intake_id),
            TASK_QUEUE,
            k.tenant_tasks(first.tenant),
            sub.batch[0] if sub.batch else sub.ids_key,
        ]
        args: list[str | int] = [
            len(sub.records),
            queued_ms,
            repr(first.created_at),
            sub.ids_ttl_s,
            MOVE_CHUNK,
            self.retention.batch_s,
            "1" if sub.batch and sub.batch[1].get("webhook_url") else "0",
            len(shards),
        ]
        records: list[str] = []
        for shard, recs in shards.items():
            names += [k.queued(shard), self._counts_key(sub, shard)]
            head = k.task(recs[0].id)[: -len(recs[0].id)]  # the shard's "{p}:{s}:task:"
            args += [len(recs), len(head) + 1]
            records += [head + rec.id for rec in recs]
        names += records
        if sub.batch:
            args += [x for kv in sub.batch[1].items() for x in kv]
        if not int(await self._commit(keys=names, args=args)):
            raise IntakeExpired(f"the staged tasks of {sub.intake_id} expired before commit")

    # -- a cluster, or the broker on its own Redis: one script per shard -------------------

    def _counts_key(self, sub: Submission, shard: int) -> str:
        first = sub.records[0]
        if sub.batch and first.batch_id:
            return self.keys.batch_counts(first.batch_id, shard)
        return self.keys.queued(shard)

    def _shard_keys(self, sub: Submission, shard: int, recs: Sequence[TaskRecord]) -> list[str]:
        return [
            self.keys.queued(shard),
            self._counts_key(sub, shard),
            *(self.keys.task(r.id) for r in recs),
        ]

    async def _load(self) -> None:
        if not self._loaded:
            await aload_scripts(self.client, (STAGE_RECORDS, COMMIT_SHARD, UNCOMMIT_SHARD))
            self._loaded = True

    async def stage_records(self, records: Sequence[TaskRecord]) -> None:
        """``STAGE_RECORDS`` for ``records`` (one shard's); see ``Staging``."""
        await self._load()
        await self._stage_records(
            keys=[self.keys.task(r.id) for r in records],
            args=[INTAKE_TTL_S, records_json(records)],
        )

    async def _commit_per_shard(self, sub: Submission, queued_ms: int) -> None:
        await self._load()
        k = self.keys
        first = sub.records[0]
        is_batch = "1" if sub.batch else "0"
        webhook = "1" if sub.batch and sub.batch[1].get("webhook_url") else "0"
        shards = by_shard(k, sub.records)
        committed: list[int] = []
        try:
            for shard, recs in shards.items():
                for start in range(0, len(recs), MOVE_CHUNK):
                    chunk = recs[start : start + MOVE_CHUNK]
                    if not committed or committed[-1] != shard:
                        committed.append(shard)
                    ok = await self._commit_shard(
                        keys=self._shard_keys(sub, shard, chunk),
                        args=[queued_ms, self.retention.batch_s, is_batch, webhook],
                    )
                    if not int(ok):
                        raise IntakeExpired(
                            f"the staged tasks of {sub.intake_id} expired before commit"
                        )
            ids = [r.id for r in sub.records]
            tenant = k.tenant_tasks(first.tenant)
            for start in range(0, len(ids), MOVE_CHUNK):
                score = first.created_at
                await self.client.zadd(
                    tenant, dict.fromkeys(ids[start : start + MOVE_CHUNK], score)
                )
            if sub.batch:
                await self.client.hset(sub.batch[0], mapping=sub.batch[1])  # type: ignore[arg-type]
                await self.client.expire(sub.batch[0], self.retention.batch_s)
            # last: the messages, all or none (one MULTI/EXEC on the broker)
            pipe = self.broker.pipeline(transaction=True)
            messages = RunTaskMessages(queued_ms, first.batch_id)
            for start in range(0, len(sub.records), BULK_CHUNK):
                ids = [r.id for r in sub.records[start : start + BULK_CHUNK]]
                pipe.lpush(TASK_QUEUE, *messages.messages(ids))
            await pipe.execute()
        except BaseException:
            await self._uncommit(sub, committed)
            raise
        if sub.ids_ttl_s > 0:
            await self.client.expire(sub.ids_key, sub.ids_ttl_s)
        else:
            await self.client.delete(sub.ids_key)

    async def _uncommit(self, sub: Submission, shards: Sequence[int]) -> None:
        """Take back what ``_commit_per_shard`` wrote in ``shards`` and after them."""
        k = self.keys
        shard_records = by_shard(k, sub.records)
        ids = [r.id for r in sub.records]
        tenant = k.tenant_tasks(sub.records[0].tenant)
        for start in range(0, len(ids), MOVE_CHUNK):
            await self.client.zrem(tenant, *ids[start : start + MOVE_CHUNK])
        if sub.batch:
            await self.client.delete(sub.batch[0])
        for shard in shards:
            recs = shard_records[shard]
            for start in range(0, len(recs), MOVE_CHUNK):
                await self._uncommit_shard(
                    keys=self._shard_keys(sub, shard, recs[start : start + MOVE_CHUNK]),
                    args=["1" if sub.batch else "0"],
                )

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
        if self.per_shard:  # a failed commit undid itself: its records are gone
            return False if int(ttl) != -1 else None
        return not staged and int(ttl) == -1

    async def discard(self, sub: Submission) -> None:
        """Delete whatever ``stage`` wrote of ``sub`` (DEL works even when Redis is full)."""
        k = self.keys
        names = [sub.ids_key, k.intake_messages(sub.intake_id)]
        names += [k.task(rec.id) for rec in sub.records]
        pipe = self.client.pipeline(transaction=False)
        if is_cluster(self.client):  # a cluster pipeline deletes one key per command
            for name in names:
                pipe.delete(name)
        else:
            for start in range(0, len(names), MOVE_CHUNK):
                pipe.delete(*names[start : start + MOVE_CHUNK])
        await pipe.execute()


def queued_ms(rec: TaskRecord) -> int:
    """A new task's score in the queued index, and the push time its message carries."""
    return int(rec.created_at * 1000)
