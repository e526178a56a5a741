"""The webhook outbox: the durable schedule of every delivery, in Redis (see ``store.keys``).

No delivery lives only in a process's memory. ``FINISH`` puts a finished task with a
webhook into its shard's ``{p}:{s}:webhooks:due`` with the time its first attempt is due;
for a batch with one, it notes in ``{p}:{s}:batches:done`` that the batch's tasks in that
shard have all finished, and ``due`` (every worker's loop) schedules the batch's
``batch.finished`` in the batch's shard once the shards' counts add up to its total
(``BATCH_DUE``, once). Every worker's delivery loop asks for due entries and
``claim``s each: one Lua script that checks it is still due, counts the attempt, records a
lease token ``"{worker}/{attempt}"`` and moves the entry ``lease_s`` ahead, so two workers
never send the same attempt and a worker that dies mid-attempt leaves the entry due again
when its lease runs out (the next claim records the lost attempt). ``settle`` (fenced by the
token) records the attempt and either moves the entry to its next attempt's time or, on a
final outcome, removes it and lets the delivery's record expire later.

States of ``{p}:webhook:{id}``: ``delivering`` (claimed), ``pending`` (a retry is due at
``next_at``), and the final ``delivered``, ``failed`` (the receiver refused it),
``given_up`` (retried for the whole window), ``disabled`` (the endpoint answered 410 Gone,
now or before) and ``refused`` (the destination is not allowed).

The API reads a delivery with ``delivery_view`` on its asyncio client.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import redis
import redis.asyncio as aioredis

from agent.models import TERMINAL_STATUSES
from agent.text import text_of
from store.batches import sum_counters
from store.keys import (
    DEFAULT_RETENTION,
    WEBHOOK_ATTEMPTS_KEPT,
    WEBHOOK_FIRST_DELAY_S,
    WEBHOOK_LEASE_S,
    Keys,
    Retention,
)
from store.patience import patiently

T = TypeVar("T")

TASK_EVENT = "task.finished"
BATCH_EVENT = "batch.finished"
FINAL_STATES = ("delivered", "failed", "given_up", "disabled", "refused")

# CLAIM: take the attempt of one due delivery. Its record is made at the first claim from
# the task's or batch's hash (url, tenant).
# KEYS: 1 due zset, 2 delivery hash, 3 attempts list, 4 the task or batch hash
# ARGV: 1 subject id, 2 now, 3 lease_s, 4 worker id, 5 retry window_s, 6 event type
# Returns {attempt, token, the delivery hash (HGETALL)}; {0, reason} when there is nothing
# to send ("not_due", "gone": no such task or no webhook, "settled").
CLAIM = """
local due = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not due or tonumber(due) > tonumber(ARGV[2]) then return {0, 'not_due'} end
if redis.call('EXISTS', KEYS[2]) == 0 then
  local url = redis.call('HGET', KEYS[4], 'webhook_url')
  local tenant = redis.call('HGET', KEYS[4], 'tenant')
  if not url or not tenant then
    redis.call('ZREM', KEYS[1], ARGV[1])
    return {0, 'gone'}
  end
  redis.call('HSET', KEYS[2], 'id', ARGV[1], 'event', ARGV[6], 'url', url, 'tenant', tenant,
    'created_at', ARGV[2], 'deadline', tonumber(ARGV[2]) + tonumber(ARGV[5]),
    'attempts', 0, 'state', 'pending')
end
local state = redis.call('HGET', KEYS[2], 'state')
if state ~= 'pending' and state ~= 'delivering' then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return {0, 'settled'}
end
local n = redis.call('HINCRBY', KEYS[2], 'attempts', 1)
if state == 'delivering' then
  local lost = {attempt = n - 1, at = tonumber(redis.call('HGET', KEYS[2], 'leased_at')),
    outcome = 'lost', error = 'the worker making this attempt was lost before it finished'}
  redis.call('RPUSH', KEYS[3], cjson.encode(lost))
end
local token = ARGV[4] .. '/' .. n
redis.call('HSET', KEYS[2], 'lease', token, 'leased_at', ARGV[2], 'state', 'delivering')
redis.call('HDEL', KEYS[2], 'next_at')
redis.call('ZADD', KEYS[1], tonumber(ARGV[2]) + tonumber(ARGV[3]), ARGV[1])
return {n, token, redis.call('HGETALL', KEYS[2])}
"""

# SETTLE: record an attempt and schedule the next one or finish the delivery; fenced by
# the lease token.
# KEYS: 1 due zset, 2 delivery hash, 3 attempts list, 4 the tenant's disabled endpoints
# ARGV: 1 subject id, 2 token, 3 attempt JSON, 4 state ("pending" = retry at ARGV[5], or a
#       final state), 5 next_at, 6 ttl_s of a settled record, 7 now, 8 attempts kept,
#       9 the endpoint's canonical URL (a "disabled" delivery disables it for the tenant)
# Returns 1, or 0 when fenced out (the lease expired and the attempt was claimed again).
SETTLE = """
if redis.call('HGET', KEYS[2], 'lease') ~= ARGV[2] then return 0 end
redis.call('RPUSH', KEYS[3], ARGV[3])
redis.call('LTRIM', KEYS[3], -tonumber(ARGV[8]), -1)
redis.call('HDEL', KEYS[2], 'lease', 'leased_at')
redis.call('HSET', KEYS[2], 'state', ARGV[4])
if ARGV[4] == 'pending' then
  redis.call('ZADD', KEYS[1], ARGV[5], ARGV[1])
  redis.call('HSET', KEYS[2], 'next_at', ARGV[5])
else
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('HSET', KEYS[2], 'settled_at', ARGV[7])
  redis.call('EXPIRE', KEYS[2], ARGV[6])
  redis.call('EXPIRE', KEYS[3], ARGV[6])
  if ARGV[4] == 'disabled' then
    redis.call('HSETNX', KEYS[4], ARGV[9], ARGV[7])
  end
end
return 1
"""


# BATCH_DUE: schedule a batch's batch.finished once, when all its tasks have finished.
# KEYS (the batch's shard): 1 batch hash, 2 due zset
# ARGV: 1 its tasks finished (summed over the shards), 2 now, 3 first delay_s, 4 batch id
# Returns 1 when it was scheduled now; 0 otherwise (not all finished, no webhook, done).
BATCH_DUE = """
if redis.call('HEXISTS', KEYS[1], 'webhook_url') == 0 then return 0 end
if tonumber(ARGV[1]) < tonumber(redis.call('HGET', KEYS[1], 'total') or '0') then return 0 end
if redis.call('HSETNX', KEYS[1], 'finished_at', ARGV[2]) == 0 then return 0 end
redis.call('ZADD', KEYS[2], tonumber(ARGV[2]) + tonumber(ARGV[3]), ARGV[4])
return 1
"""


@dataclass(frozen=True, slots=True)
class DeliveryLease:
    """One claimed attempt of one delivery."""

    subject_id: str  # the task's or the batch's id
    event: str  # TASK_EVENT or BATCH_EVENT
    url: str
    tenant: str
    attempt: int  # 1 for the first
    token: str  # fences ``settle``
    created_at: float
    deadline: float  # no retry is scheduled after this

    @property
    def msg_id(self) -> str:
        """``webhook-id``: the same for every attempt, so receivers can de-duplicate."""
        return f"msg_{self.subject_id}"


def event_of(subject_id: str) -> str:
    return BATCH_EVENT if subject_id.startswith("batch_") else TASK_EVENT


def subject_key(keys: Keys, subject_id: str) -> str:
    return keys.batch(subject_id) if subject_id.startswith("batch_") else keys.task(subject_id)


class WebhookOutbox:
    """The workers' side. Construction does no I/O. Calls retry while Redis is unreachable
    for up to ``patience_s`` (a settle lost to an outage would send the attempt again)."""

    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        *,
        lease_s: float = WEBHOOK_LEASE_S,
        patience_s: float = 30.0,
        clock: Callable[[], float] = time.time,
        retention: Retention = DEFAULT_RETENTION,
    ) -> None:
        self.r = client
        self.keys = keys
        self.retention = retention
        self.lease_s = lease_s
        self.patience_s = patience_s
        self.clock = clock
        self._claim = client.register_script(CLAIM)
        self._settle = client.register_script(SETTLE)
        self._batch_due = client.register_script(BATCH_DUE)

    def due(self, limit: int) -> list[str]:
        """Ids of deliveries whose next attempt is due now, soonest first (at most
        ``limit``), after scheduling the batches that finished (``schedule_batches``)."""
        self.schedule_batches()
        now = self.clock()
        pipe = self.r.pipeline(transaction=False)
        for shard in self.keys.shard_ids:
            pipe.zrangebyscore(self.keys.webhook_outbox(shard), "-inf", now, 0, limit, True)
        entries = sorted((float(t), text_of(i)) for found in pipe.execute() for i, t in found)
        return [i for _, i in entries[:limit]]

    def schedule_batches(self) -> int:
        """Schedule the batch.finished of each batch whose tasks all finished; how many."""
        k = self.keys
        pipe = self.r.pipeline(transaction=False)
        for shard in k.shard_ids:
            pipe.zrange(k.batches_done(shard), 0, -1)
        noted = [
            (shard, text_of(b))
            for shard, ids in zip(k.shard_ids, pipe.execute(), strict=True)
            for b in ids
        ]
        scheduled = 0
        for shard, batch_id in noted:
            _, counts = self.batch_counts(batch_id)
            scheduled += int(
                self._batch_due(
                    keys=[k.batch(batch_id), k.webhook_outbox(k.shard(batch_id))],
                    args=[
                        counts.get("finished", 0),
                        repr(self.clock()),
                        WEBHOOK_FIRST_DELAY_S,
                        batch_id,
                    ],
                )
            )
            # after BATCH_DUE: a worker lost in between leaves the note, the next one retries
            self.r.zrem(k.batches_done(shard), batch_id)
        return scheduled

    def claim(self, subject_id: str, worker_id: str, window_s: float) -> DeliveryLease | None:
        """Take the next attempt of ``subject_id``'s delivery, or None when another worker
        took it first, it is not due, or there is nothing to deliver any more."""
        k = self.keys
        out = self._claim(
            keys=[
                k.webhook_outbox(k.shard(subject_id)),
                k.webhook(subject_id),
                k.webhook_attempts(subject_id),
                subject_key(k, subject_id),
            ],
            args=[
                subject_id,
                repr(self.clock()),
                self.lease_s,
                worker_id,
                window_s,
                event_of(subject_id),
            ],
        )
        if int(out[0]) == 0:
            return None
        flat = out[2]
        h = {text_of(a): text_of(b) for a, b in zip(flat[::2], flat[1::2], strict=True)}
        return DeliveryLease(
            subject_id=subject_id,
            event=h["event"],
            url=h["url"],
            tenant=h["tenant"],
            attempt=int(out[0]),
            token=text_of(out[1]),
            created_at=float(h["created_at"]),
            deadline=float(h["deadline"]),
        )

    def settle(
        self,
        lease: DeliveryLease,
        attempt: Mapping[str, Any],
        state: str,
        next_at: float | None = None,
        endpoint: str = "",
    ) -> bool:
        """Record ``attempt`` and move the delivery to ``state``: ``"pending"`` (retry at
        ``next_at``) or a final state; ``"disabled"`` also disables ``endpoint`` (the
        canonical URL) for the tenant. False when this lease was fenced out."""
        if state == "disabled" and not endpoint:
            raise ValueError("disabling needs the endpoint's URL")
        if (state == "pending") != (next_at is not None):
            raise ValueError("a retry needs next_at; a final state takes none")
        if state != "pending" and state not in FINAL_STATES:
            raise ValueError(f"unknown delivery state {state!r}")
        k = self.keys
        out = self._patient(
            lambda: self._settle(
                keys=[
                    k.webhook_outbox(k.shard(lease.subject_id)),
                    k.webhook(lease.subject_id),
                    k.webhook_attempts(lease.subject_id),
                    k.webhooks_disabled(lease.tenant, k.shard(lease.subject_id)),
                ],
                args=[
                    lease.subject_id,
                    lease.token,
                    json.dumps(dict(attempt), separators=(",", ":")),
                    state,
                    repr(next_at or 0.0),
                    self.retention.record_s,
                    repr(self.clock()),
                    WEBHOOK_ATTEMPTS_KEPT,
                    endpoint,
                ],
            )
        )
        return int(out) == 1

    def disabled_since(self, tenant: str, url: str) -> float | None:
        """When ``url`` answered 410 Gone for ``tenant`` (None: it is not disabled)."""
        pipe = self.r.pipeline(transaction=False)
        for shard in self.keys.shard_ids:
            pipe.hget(self.keys.webhooks_disabled(tenant, shard), url)
        found = [float(text_of(v)) for v in pipe.execute() if v]
        return min(found) if found else None

    def batch(self, batch_id: str) -> tuple[dict[str, str], dict[str, int]]:
        """A batch's record (with ``correct``: how many were graded correct) and its
        finished counts per terminal status (for batch.finished)."""
        batch, counters = self.batch_counts(batch_id)
        if batch:
            batch["correct"] = str(counters.get("correct", 0))
        terminal = {s.value for s in TERMINAL_STATUSES}
        return batch, {k: n for k, n in counters.items() if k in terminal and n}

    def batch_counts(self, batch_id: str) -> tuple[dict[str, str], dict[str, int]]:
        """A batch's record and its counters, summed over the shards."""
        k = self.keys
        pipe = self.r.pipeline(transaction=False)
        pipe.hgetall(k.batch(batch_id))
        for shard in k.shard_ids:
            pipe.hgetall(k.batch_counts(batch_id, shard))
        h, *raw = pipe.execute()
        return {text_of(a): text_of(b) for a, b in h.items()}, sum_counters(raw)

    def _patient(self, op: Callable[[], T]) -> T:
        return patiently(op, self.patience_s)


async def delivery_view(client: aioredis.Redis, keys: Keys, subject_id: str) -> dict[str, Any]:
    """What ``GET /v1/{tasks|batches}/{id}/webhook`` shows: the delivery's state and every
    recorded attempt. ``state`` is ``waiting`` before the task or batch has finished and
    ``scheduled`` between then and the first attempt."""
    pipe = client.pipeline(transaction=False)
    pipe.hgetall(keys.webhook(subject_id))
    pipe.lrange(keys.webhook_attempts(subject_id), 0, -1)
    pipe.zscore(keys.webhook_outbox(keys.shard(subject_id)), subject_id)
    h, attempts, due = await pipe.execute()
    d = {text_of(a): text_of(b) for a, b in (h or {}).items()}
    state = d.get("state") or ("scheduled" if due is not None else "waiting")
    return {
        "id": f"msg_{subject_id}",
        "event": event_of(subject_id),
        "state": state,
        "attempts": [json.loads(text_of(a)) for a in attempts],
        "next_attempt_at": float(d["next_at"])
        if "next_at" in d
        else (float(due) if due is not None and "state" not in d else None),
        "created_at": float(d["created_at"]) if "created_at" in d else None,
        "settled_at": float(d["settled_at"]) if "settled_at" in d else None,
        "deadline": float(d["deadline"]) if "deadline" in d else None,
    }


async def disabled_endpoints(
    client: aioredis.Redis, keys: Keys, tenant: str, urls: list[str]
) -> dict[str, float]:
    """Which of ``urls`` answered 410 Gone for ``tenant``, and when."""
    if not urls:
        return {}
    pipe = client.pipeline(transaction=False)
    for shard in keys.shard_ids:
        pipe.hmget(keys.webhooks_disabled(tenant, shard), urls)
    out: dict[str, float] = {}
    for values in await pipe.execute():
        for u, v in zip(urls, values, strict=True):
            if v:
                out[u] = min(out.get(u, float("inf")), float(text_of(v)))
    return out


def enable_endpoint(client: redis.Redis, keys: Keys, tenant: str, url: str) -> bool:
    """Let ``url`` receive the tenant's webhooks again; False if it was not disabled."""
    pipe = client.pipeline(transaction=False)
    for shard in keys.shard_ids:
        pipe.hdel(keys.webhooks_disabled(tenant, shard), url)
    return any(pipe.execute())
