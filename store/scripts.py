"""Lua scripts for atomic, fenced state transitions.

A write by a worker is *fenced*: it only lands while ``{p}:lease:{id}`` still holds that
worker's ``"{worker_id}/{attempt}"``. A worker that lost its lease (it stalled, another
attempt took over) has its writes dropped instead of corrupting the record.

Every key a script touches is in the shard of the task it acts on (``store.keys``), so a
script touches one hash slot, as a Redis Cluster requires.

Batch counters: every script that changes the status of a task of a batch also moves it
between the fields of its batch's counts in its shard (``store.keys``), in the same step,
so the counts are exact whatever happens to the worker, and a batch's status is read from
that one hash whatever the batch's size. A script learns of the batch by the counts key
its caller passes (optional; absent for a task outside any batch).

Register with ``client.register_script(SOURCE)`` on a sync or an asyncio client alike.
"""

from __future__ import annotations

import json

from agent.events import Event, EventType
from agent.models import Result
from store.keys import DEFAULT_RETENTION, STREAM_MAXLEN, WEBHOOK_FIRST_DELAY_S, Keys, Retention

# FINISH: move a task to a terminal status exactly once.
# KEYS (all in the task's shard): 1 task hash, 2 lease, 3 running zset, 4 events stream,
#       5 the tenant's finished counter, 6 finished counts hash, 7 webhook outbox zset,
#       8 batch counts hash and 9 finished batches zset (optional: only when the task
#       belongs to a batch). Build the call with finish_call.
# ARGV: 1 owner ("worker/attempt"; "" = unfenced, allowed only while the task is queued,
#       which is how the API cancels a task no worker has taken), 2 status, 3 result JSON,
#       4 finished_at, 5 terminal event JSON, 6 stream maxlen, 7 stream ttl_s,
#       8 record ttl_s, 9 task id, 10 webhook first delay_s, 11 the task's last step event
#       JSON ("" = none: it was appended by STEP already), 12 that step's seq, 13 the grade
#       ("1" correct, "0" wrong, "" not graded), 14 turns, 15 prompt tokens,
#       16 completion tokens, 17 batch id
# The batch counts (store.keys) move the task from the status it had to the
# terminal one and add its turns, tokens and grade, in the same step as the status.
# A batch with a webhook whose tasks in this shard have all finished (the finished count
# reaches the shard's total, once, because each task finishes once) goes into the shard's
# finished batches, from which the workers schedule its batch.finished once every shard's
# count adds up (store.webhooks.BATCH_DUE).
# The last step (the reply that answered) rides along with the result, appended first and
# idempotent on its seq as STEP is: one round trip fewer at the end of every task.
# Returns: the terminal event's stream id; 0 if already terminal; -1 if fenced out;
#          -2 if there is no such task; -3 if the stored seq is behind the last step's
#          (Redis lost recent writes: nothing is written, resume from the checkpoint).
FINISH = """
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return -2 end
if st ~= 'queued' and st ~= 'running' then return 0 end
if ARGV[1] ~= '' then
  if redis.call('GET', KEYS[2]) ~= ARGV[1] then return -1 end
elseif st ~= 'queued' then
  return -1
end
if ARGV[11] ~= '' then
  local seq = tonumber(redis.call('HGET', KEYS[1], 'seq') or '0')
  if seq + 1 < tonumber(ARGV[12]) then return -3 end
  if seq < tonumber(ARGV[12]) then
    redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[6], '*', 'e', ARGV[11])
    redis.call('HSET', KEYS[1], 'seq', ARGV[12])
  end
end
redis.call('HSET', KEYS[1], 'status', ARGV[2], 'result', ARGV[3], 'finished_at', ARGV[4])
local id = redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[6], '*', 'e', ARGV[5])
redis.call('EXPIRE', KEYS[4], ARGV[7])
redis.call('EXPIRE', KEYS[1], ARGV[8])
redis.call('DEL', KEYS[2])
redis.call('ZREM', KEYS[3], ARGV[9])
redis.call('INCR', KEYS[5])
redis.call('HINCRBY', KEYS[6], ARGV[2], 1)
if redis.call('HEXISTS', KEYS[1], 'webhook_url') == 1 then
  redis.call('ZADD', KEYS[7], tonumber(ARGV[4]) + tonumber(ARGV[10]), ARGV[9])
end
if KEYS[8] then
  redis.call('HINCRBY', KEYS[8], st, -1)
  redis.call('HINCRBY', KEYS[8], ARGV[2], 1)
  local done = redis.call('HINCRBY', KEYS[8], 'finished', 1)
  redis.call('HINCRBY', KEYS[8], 'turns', ARGV[14])
  redis.call('HINCRBY', KEYS[8], 'prompt_tokens', ARGV[15])
  redis.call('HINCRBY', KEYS[8], 'completion_tokens', ARGV[16])
  if ARGV[13] == '1' then redis.call('HINCRBY', KEYS[8], 'correct', 1) end
  if ARGV[2] == 'completed' and ARGV[13] ~= '0' then
    redis.call('HINCRBY', KEYS[8], 'succeeded', 1)
  end
  if redis.call('HGET', KEYS[8], 'webhook') == '1'
     and done >= tonumber(redis.call('HGET', KEYS[8], 'total') or '0') then
    redis.call('ZADD', KEYS[9], ARGV[4], ARGV[17])
  end
end
return id
"""


def finish_call(
    keys: Keys,
    task_id: str,
    tenant: str,
    batch_id: str | None,
    *,
    owner: str,
    result: Result,
    event: Event,
    finished_at: float,
    stream_maxlen: int = STREAM_MAXLEN,
    last_step: tuple[Event, int] | None = None,
    retention: Retention = DEFAULT_RETENTION,
) -> tuple[list[str], list[str | int | float]]:
    """The KEYS and ARGV of ``FINISH`` for one task; ``last_step`` (event, seq) is
    appended before the terminal event when STEP has not written it."""
    shard = keys.shard(task_id)
    names = [
        keys.task(task_id),
        keys.lease(task_id),
        keys.running(shard),
        keys.events(task_id),
        keys.tenant_finished(tenant, shard),
        keys.finished_counts(shard),
        keys.webhook_outbox(shard),
    ]
    if batch_id:
        names += [keys.batch_counts(batch_id, shard), keys.batches_done(shard)]
    args: list[str | int | float] = [
        owner,
        result.status.value,
        json.dumps(result.to_dict(), separators=(",", ":")),
        repr(finished_at),
        event.to_json(),
        stream_maxlen,
        retention.stream_s,
        retention.record_s,
        task_id,
        WEBHOOK_FIRST_DELAY_S,
        last_step[0].to_json() if last_step else "",
        last_step[1] if last_step else 0,
        "" if result.correct is None else "1" if result.correct else "0",
        result.turns,
        result.usage.prompt_tokens,
        result.usage.completion_tokens,
        batch_id or "",
    ]
    return names, args


# --- worker-side transitions (store.worker_store) -------------------------------------
# A task's hash also holds, once a worker has run it: "checkpoint" (the loop's state after
# its last appended step), "seq" (how many events this task's workers appended; an append
# carries the seq it expects to write, so a retried call never adds an entry twice) and
# "worker" (who holds or last held the lease).

# CLAIM: take a delivered task, unless it is finished or someone holds a live lease; and,
# for an attempt within ARGV[6], append its task.started event (turn: the checkpoint's; data:
# the worker, whether it resumes), so a task's start costs one round trip. A delivery also
# moves the queue's taken mark to its message's push time (ARGV[8]; 0 = not known), and a
# claimed task leaves the queued index.
# A claim of a queued task moves it from "queued" to "running" in its batch's counts. The
# caller does not know the task's batch before the claim: it passes the one its message
# names (ARGV[9], and its counts key as KEYS[7]); when that is not the record's batch
# (an old message, one that named none) nothing is written and the reply names the
# record's batch, for the caller to claim again with the right key.
# KEYS: 1 task hash, 2 lease, 3 running zset, 4 events stream, 5 queued zset, 6 taken mark,
#       7 batch counts hash (only when ARGV[9] names a batch)
# ARGV: 1 worker id, 2 now (unix s), 3 lease ttl ms, 4 lease expiry (unix ms), 5 task id,
#       6 max attempts (0: append no event), 7 stream maxlen, 8 message push time (unix ms),
#       9 the batch id the message names ("" = none), 10-13 the task.started event's
#       JSON, written by Event.to_json and cut where the turn and the attempt go (only the
#       script knows them): 10 before the turn, 11 between the turn and the attempt, 12
#       after the attempt for a fresh start, 13 after it for a resumed one (see
#       started_parts)
# Returns: {attempt, checkpoint or "", seq (after the started event), started_at, the record
#          after the claim (HGETALL)} on success; {0, reason} when the delivery must be
#          dropped (reason: "missing", "terminal", "duplicate"); {-1, batch id} when
#          ARGV[9] is not the task's batch.
CLAIM = """
local pushed = tonumber(ARGV[8])
if pushed > 0 and pushed > tonumber(redis.call('GET', KEYS[6]) or '0') then
  redis.call('SET', KEYS[6], ARGV[8])
end
local st = redis.call('HGET', KEYS[1], 'status')
if not st then
  redis.call('ZREM', KEYS[5], ARGV[5])
  return {0, 'missing'}
end
if st ~= 'queued' and st ~= 'running' then
  redis.call('ZREM', KEYS[5], ARGV[5])
  return {0, 'terminal'}
end
if redis.call('EXISTS', KEYS[2]) == 1 then return {0, 'duplicate'} end
local batch = redis.call('HGET', KEYS[1], 'batch_id') or ''
if batch ~= ARGV[9] then return {-1, batch} end
if st == 'queued' and KEYS[7] then
  redis.call('HINCRBY', KEYS[7], 'queued', -1)
  redis.call('HINCRBY', KEYS[7], 'running', 1)
end
redis.call('ZREM', KEYS[5], ARGV[5])
local attempt = redis.call('HINCRBY', KEYS[1], 'attempt', 1)
redis.call('SET', KEYS[2], ARGV[1] .. '/' .. attempt, 'PX', ARGV[3])
local started = redis.call('HGET', KEYS[1], 'started_at')
if not started then
  started = ARGV[2]
  redis.call('HSET', KEYS[1], 'started_at', started)
end
redis.call('HSET', KEYS[1], 'status', 'running', 'worker', ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[5])
local cp = redis.call('HGET', KEYS[1], 'checkpoint') or ''
local seq = tonumber(redis.call('HGET', KEYS[1], 'seq') or '0')
local handbacks = tonumber(redis.call('HGET', KEYS[1], 'handbacks') or '0')
if attempt - handbacks <= tonumber(ARGV[6]) then
  local turn, rest = 0, ARGV[12]
  if cp ~= '' then turn, rest = cjson.decode(cp)['turn'] or 0, ARGV[13] end
  local event = ARGV[10] .. string.format('%d', turn) .. ARGV[11] .. attempt .. rest
  seq = seq + 1
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[7], '*', 'e', event)
  redis.call('HSET', KEYS[1], 'seq', seq)
end
return {attempt, cp, seq, started, redis.call('HGETALL', KEYS[1])}
"""

_TURN_HOLE, _ATTEMPT_HOLE = -(2**52) + 17, -(2**52) + 29  # numbers no real event holds


def started_parts(worker_id: str, now: float) -> list[str]:
    """ARGV 9-12 of ``CLAIM``: ``task.started`` as ``Event.to_json`` encodes it, cut around
    its turn and attempt, with the tails of a fresh and of a resumed start."""
    cut = []
    for resumed in (False, True):
        event = Event(
            EventType.STARTED,
            _TURN_HOLE,
            _ATTEMPT_HOLE,
            now,
            {"worker": worker_id, "resumed": resumed},
        )
        # the first occurrences: "type" and its fixed value come before them, data after
        head, _, rest = event.to_json().partition(str(_TURN_HOLE))
        mid, _, tail = rest.partition(str(_ATTEMPT_HOLE))
        cut.append((head, mid, tail))
    (head, mid, fresh), (_, _, resumed_tail) = cut
    return [head, mid, fresh, resumed_tail]


# RENEW: extend a lease held by ARGV[1]; run pipelined for all of a worker's tasks.
# A lease that vanished (Redis restarted and lost the last second of writes, or paused
# longer than the TTL) is taken back while the record still says this attempt runs and
# no one else claimed it in between.
# An attempt that ended by its own hand (it finished the task, or released it) is not a
# lost lease: a renewal racing with that end says "ended", so nobody warns about it.
# KEYS: 1 task hash, 2 lease, 3 running zset
# ARGV: 1 owner, 2 lease ttl ms, 3 lease expiry (unix ms), 4 task id, 5 attempt
# Returns: {1 if the lease is held, 0 if lost, 2 if the task is finished or this owner
#          released it; cancel_requested "1"/"0"}
RENEW = """
local cancel = redis.call('HGET', KEYS[1], 'cancel_requested') or '0'
local cur = redis.call('GET', KEYS[2])
if cur == ARGV[1] then
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
  redis.call('ZADD', KEYS[3], ARGV[3], ARGV[4])
  return {1, cancel}
end
local st = redis.call('HGET', KEYS[1], 'status')
if not cur and st == 'running' and redis.call('HGET', KEYS[1], 'attempt') == ARGV[5] then
  redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
  redis.call('ZADD', KEYS[3], ARGV[3], ARGV[4])
  return {1, cancel}
end
if st and st ~= 'queued' and st ~= 'running' then return {2, cancel} end
if redis.call('HGET', KEYS[1], 'released_by') == ARGV[1] then return {2, cancel} end
return {0, cancel}
"""

# STEP: append one event (and the checkpoint after it) while owning the lease; idempotent
# on ARGV[5] (the seq this event gets), so a call retried after a lost reply is a no-op.
# KEYS: 1 task hash, 2 lease, 3 events stream
# ARGV: 1 owner, 2 event JSON, 3 stream maxlen, 4 checkpoint JSON ("" = keep), 5 seq
# Returns: the stream id; 1 if that seq was already written; 0 if the stored seq is behind
# the caller's (Redis lost recent writes: resume from the stored checkpoint instead);
# false if fenced out.
STEP = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return false end
local seq = tonumber(redis.call('HGET', KEYS[1], 'seq') or '0')
if seq >= tonumber(ARGV[5]) then return 1 end
if seq + 1 < tonumber(ARGV[5]) then return 0 end
local id = redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[3], '*', 'e', ARGV[2])
redis.call('HSET', KEYS[1], 'seq', ARGV[5])
if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], 'checkpoint', ARGV[4]) end
return id
"""

# RELEASE_FOR_RETRY: give a task back without finishing it (an infrastructure fault to retry after a
# backoff, or a worker shutting down). The task stays in the running index with expiry
# ARGV[2], so if the retry message is lost with its worker the sweeper re-enqueues it.
# KEYS: 1 task hash, 2 lease, 3 running zset, 4 batch counts hash (optional)
# ARGV: 1 owner, 2 reclaim-after (unix ms), 3 task id
# Returns: 1 released; 0 fenced out.
RELEASE_FOR_RETRY = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
if KEYS[4] and redis.call('HGET', KEYS[1], 'status') == 'running' then
  redis.call('HINCRBY', KEYS[4], 'running', -1)
  redis.call('HINCRBY', KEYS[4], 'queued', 1)
end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[1], 'status', 'queued', 'released_by', ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[3])
return 1
"""

# HANDBACK: a worker that stops gives a task it has not finished back to the queue, at its
# checkpoint: lease gone, status queued, from the running index to the queued one with
# push time ARGV[3] (the caller pushes the message), and counted in "handbacks". An
# attempt handed back is not a failure: the attempt budget (max_attempts) counts
# attempt - handbacks, so a rolling restart never exhausts a task.
# KEYS: 1 task hash, 2 lease, 3 running zset, 4 queued zset, 5 batch counts hash (optional)
# ARGV: 1 owner, 2 task id, 3 now (unix ms)
# Returns: 1 handed back; 0 fenced out (finished meanwhile, or no longer this owner's).
HANDBACK = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
if KEYS[5] and redis.call('HGET', KEYS[1], 'status') == 'running' then
  redis.call('HINCRBY', KEYS[5], 'running', -1)
  redis.call('HINCRBY', KEYS[5], 'queued', 1)
end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[1], 'status', 'queued', 'released_by', ARGV[1])
redis.call('HINCRBY', KEYS[1], 'handbacks', 1)
redis.call('ZREM', KEYS[3], ARGV[2])
redis.call('ZADD', KEYS[4], ARGV[3], ARGV[2])
return 1
"""

# SWEEP: deal with one task whose lease expired (its worker died or stalled).
# KEYS: 1 task hash, 2 lease, 3 running zset, 4 queued zset, 5 batch counts hash (optional)
# ARGV: 1 expired before (unix ms), 2 max attempts (of attempt - handbacks, see HANDBACK),
#       3 task id, 4 sweeper id, 5 lease ttl ms,
#       6 now (unix ms): the new message's push time, its score in the queued index
# Returns: "requeue" (status back to queued, from the running index to the queued one:
#          enqueue a new message),
#          "exhausted" (the sweeper now holds the lease as ARGV[4]/attempt: FINISH it as
#          error/worker_lost), or "skip" (it is not expired after all, or already done).
SWEEP = """
local score = redis.call('ZSCORE', KEYS[3], ARGV[3])
if not score or tonumber(score) > tonumber(ARGV[1]) then return 'skip' end
if redis.call('EXISTS', KEYS[2]) == 1 then return 'skip' end
local st = redis.call('HGET', KEYS[1], 'status')
if st ~= 'queued' and st ~= 'running' then
  redis.call('ZREM', KEYS[3], ARGV[3])
  return 'skip'
end
local attempt = tonumber(redis.call('HGET', KEYS[1], 'attempt') or '0')
local handbacks = tonumber(redis.call('HGET', KEYS[1], 'handbacks') or '0')
if attempt - handbacks >= tonumber(ARGV[2]) then
  redis.call('SET', KEYS[2], ARGV[4] .. '/' .. attempt, 'PX', ARGV[5])
  return 'exhausted'
end
if KEYS[5] and st == 'running' then
  redis.call('HINCRBY', KEYS[5], 'running', -1)
  redis.call('HINCRBY', KEYS[5], 'queued', 1)
end
redis.call('ZREM', KEYS[3], ARGV[3])
redis.call('ZADD', KEYS[4], ARGV[6], ARGV[3])
redis.call('HSET', KEYS[1], 'status', 'queued')
return 'requeue'
"""

# REQUEUE_LOST: one queued task that the sweeper found to have lost its message (see
# ``WorkerStore.requeue_lost``): still queued, no lease, and its index score (its latest
# message's push time) not after ARGV[2]. It then gets a new message: its score becomes
# ARGV[3], so no other sweeper pushes one too, and the next look at it waits for that
# message. An entry for a task that is gone, running or finished just leaves the index.
# KEYS: 1 task hash, 2 lease, 3 queued zset
# ARGV: 1 task id, 2 lost if pushed no later than (unix ms), 3 now (unix ms)
# Returns: "requeue" (push a message with push time ARGV[3]) or "skip".
REQUEUE_LOST = """
local score = redis.call('ZSCORE', KEYS[3], ARGV[1])
if not score or tonumber(score) > tonumber(ARGV[2]) then return 'skip' end
if redis.call('HGET', KEYS[1], 'status') ~= 'queued'
   or redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('ZREM', KEYS[3], ARGV[1])
  return 'skip'
end
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
return 'requeue'
"""
