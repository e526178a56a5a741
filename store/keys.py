"""Every name that crosses a process boundary through Redis, in one place.

Shards: the state of tasks is split into ``SHARDS`` shards, so that it can spread over the
masters of a Redis Cluster (a Lua script may touch the keys of one hash slot only). A
task's shard is a hash of its id (``Keys.shard``); so is a batch's and a webhook
delivery's (of its task's or batch's id). Every key a script touches carries its shard as
a hash tag, ``{p}:{s}:...`` (``s`` in literal braces, e.g. ``af:{7}:task:task_ab12``), so
the record, lease and stream of a task and the indexes and counters its transitions move
all share one slot. An index or counter that was fleet-wide is kept once per shard, and
readers merge or sum the shards (``Keys.shard_ids``). One large batch spreads over every
shard: its counters are kept per shard and summed on read.

Layout (``{p}`` is the configurable prefix, ``af`` by default; ``{s}`` a shard, 0 to
SHARDS - 1, in braces: the hash tag)::

    {p}:{s}:task:{id}          hash    the task record (see records.TaskRecord)
    {p}:{s}:events:{id}        stream  the task's events; entry field "e" = Event JSON; it
                                       starts when the task does, with its task.queued
                                       event (id 0-1), kept until then in the record's
                                       "queued_event" field (store.intake.MATERIALIZE)
    {p}:{s}:lease:{id}         string  "{worker_id}/{attempt}" with a TTL: who runs it now
    {p}:{s}:running            zset    task id -> lease expiry (unix ms); the sweeper's index
    {p}:{s}:queued             zset    task id -> when its latest message was pushed (unix
                                       ms), while it waits for a worker: the index the
                                       sweeper finds lost messages in (CLAIM removes it)
    {p}:{s}:queue:taken_ms     string  the latest push time (unix ms) of a message a worker
                                       has taken, of this shard's tasks (the queue's mark
                                       is the latest of the shards'): the queue is FIFO, so
                                       a message pushed well before it should have been
                                       taken too
    {p}:tenant:{t}:tasks       zset    task id -> created_at; GET /v1/tasks
    {p}:tenant:{t}:active      string  slots the tenant reserved for tasks (RESERVE adds,
                                       the API's undo gives back); its unfinished tasks are
                                       this minus the sum of its shards' finished counts
    {p}:{s}:tenant:{t}:finished string of the tenant's tasks in this shard, how many
                                       finished (FINISH adds 1)
    {p}:{s}:batch:{id}         hash    the batch record (in the batch's shard)
    {p}:{s}:batch:{id}:tasks   list    the batch's task ids, in input order
    {p}:{s}:batch:{id}:counts  hash    the batch's counters over its tasks in shard s (one
                                       hash per shard its tasks fall in), kept by the
                                       scripts that change a task's status
                                       (store.scripts): status -> tasks in it now (queued,
                                       running and each terminal status), finished, and
                                       over the finished tasks: turns, prompt_tokens,
                                       completion_tokens, correct (graded correct),
                                       succeeded (completed, not graded wrong); total (its
                                       tasks in this shard) and webhook ("1": the batch has
                                       one) are set when it is written
    {p}:{s}:batches:done       zset    batch id -> when its tasks in shard s all finished,
                                       for a batch with a webhook: the workers' outbox loop
                                       sums the batch's shards and, once all finished,
                                       schedules its batch.finished (webhooks.BATCH_DUE)
    {p}:intake:{id}:messages   list    a submission's broker messages, staged until it
                                       commits (then moved to the queue); with a TTL (one
                                       per shard on a cluster: {p}:{s}:intake:{id}:messages)
    {p}:intake:{id}:ids        list    a single-task submission's ids, staged likewise (a
                                       batch stages its ids in {p}:{s}:batch:{id}:tasks)
    {p}:apikey:{sha256}        hash    tenant, name, created_at (the key itself is never stored)
    {p}:apikeys                zset    sha256 -> created_at: every key, for `keys list`
    {p}:{s}:stats:finished     hash    terminal status -> count, of shard s's tasks (FINISH
                                       bumps it; /metrics sums the shards)
    {p}:{s}:webhooks:due       zset    task or batch id -> when its webhook's next attempt is
                                       due (unix s), in the subject's shard. FINISH adds a
                                       finished task with a webhook, BATCH_DUE a batch with
                                       one when its last task finished; a claim moves it a
                                       lease ahead; a final outcome removes it
    {p}:{s}:webhook:{id}       hash    the delivery of that task's or batch's webhook: event,
                                       url, tenant, state, attempts, lease, deadline, ...
    {p}:{s}:webhook:{id}:attempts list  one JSON per attempt (at, status_code or error,
                                       latency_ms, outcome), oldest first
    {p}:tenant:{t}:whsec       hash    the tenant's signing secrets: current, previous,
                                       previous_until (unix s), rotated_at
    {p}:{s}:tenant:{t}:webhooks:disabled  hash  endpoint URL -> when it answered 410 Gone
                                       (set by a settle in shard s; readers merge shards)
    {p}:workers                zset    worker id -> its last heartbeat (unix s): who to read
                                       the status of (entries older than WORKER_TTL_S are
                                       gone workers; readers trim them)
    {p}:worker:{id}            string  a worker's heartbeat, with a TTL: JSON status
                                       {"leases": n, "pool_idle": n, "consumer": "ok" or
                                       "stalled", "draining": bool}
    {p}:gate:{{s}}              hash    one model server's gate; ``s`` is a digest of its base
                                       URL, in literal braces (a hash tag: one cluster slot):
                                       v = version (bumped by every write), limit = the
                                       adaptive limit, epoch = decreases so far,
                                       h:{worker_id} = "held,want,in_use,expires_ms"

Migration: data written under the unsharded layout (``{p}:task:{id}``, ...) is not read
by this one; drain the fleet (every task finished) before upgrading, or start on a new
prefix (``ACTFLEET_KEY_PREFIX``).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

# Celery routing: the API enqueues by name, without importing the worker's code.
TASK_QUEUE = "actfleet"
RUN_TASK = "actfleet.run_task"

EVENT_FIELD = "e"
STREAM_MAXLEN = 10_000  # entries kept per task stream (approximate trim)
STREAM_TTL_S = 7 * 24 * 3600  # default: a stream lives this long after its terminal event
RECORD_TTL_S = 30 * 24 * 3600  # default: task records after they finish (batches: twice)
LEASE_TTL_S = 30.0  # a lease not renewed for this long is expired
# How often a worker renews its leases and its heartbeat key: several renewals fit in
# LEASE_TTL_S and WORKER_TTL_S, so one slow Redis call does not lose a lease.
HEARTBEAT_INTERVAL_S = 2.0
WORKER_TTL_S = 30.0
WEBHOOK_FIRST_DELAY_S = 0.0  # a finished task's webhook is due at once
WEBHOOK_LEASE_S = 60.0  # a claimed attempt not settled by then is claimed again (> timeouts)
WEBHOOK_ATTEMPTS_KEPT = 100  # attempts recorded per delivery (the newest)
GATE_LEASE_TTL_S = 10.0  # a worker's model-server permits come back this long after its last sync
GATE_TICK_S = 1.0  # how often a worker syncs its permits when nothing presses
GATE_FAST_TICK_S = 0.2  # ... and while its requests wait for permits it is owed or needs
GATE_STATE_TTL_S = 24 * 3600  # a gate nobody synced for this long is forgotten (limit = cap)
SHARDS = 16  # fixed: a task's shard is a hash of its id, so changing it moves every key


@dataclass(frozen=True, slots=True)
class Retention:
    """How long finished things are kept (``ACTFLEET_RECORD_RETENTION_S`` and
    ``ACTFLEET_STREAM_RETENTION_S``): a finished task's record (result, trajectory) and its
    event stream; a batch's keys outlive its task records."""

    record_s: int = RECORD_TTL_S
    stream_s: int = STREAM_TTL_S

    @property
    def batch_s(self) -> int:
        return 2 * self.record_s


DEFAULT_RETENTION = Retention()


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str = "af"
    shards: int = SHARDS

    def shard(self, object_id: str) -> int:
        """The shard of a task, a batch or a webhook subject: a hash of its id."""
        return zlib.crc32(object_id.encode()) % self.shards

    @property
    def shard_ids(self) -> range:
        return range(self.shards)

    def _in(self, object_id: str) -> str:
        return self._at(self.shard(object_id))

    def _at(self, shard: int) -> str:
        return f"{self.prefix}:{{{shard}}}"

    def task(self, task_id: str) -> str:
        return f"{self._in(task_id)}:task:{task_id}"

    def events(self, task_id: str) -> str:
        return f"{self._in(task_id)}:events:{task_id}"

    def lease(self, task_id: str) -> str:
        return f"{self._in(task_id)}:lease:{task_id}"

    def running(self, shard: int) -> str:
        return f"{self._at(shard)}:running"

    def queued(self, shard: int) -> str:
        return f"{self._at(shard)}:queued"

    def queue_taken(self, shard: int) -> str:
        return f"{self._at(shard)}:queue:taken_ms"

    def tenant_tasks(self, tenant: str) -> str:
        return f"{self.prefix}:tenant:{tenant}:tasks"

    def tenant_active(self, tenant: str) -> str:
        return f"{self.prefix}:tenant:{tenant}:active"

    def tenant_finished(self, tenant: str, shard: int) -> str:
        return f"{self._at(shard)}:tenant:{tenant}:finished"

    def batch(self, batch_id: str) -> str:
        return f"{self._in(batch_id)}:batch:{batch_id}"

    def batch_tasks(self, batch_id: str) -> str:
        return f"{self._in(batch_id)}:batch:{batch_id}:tasks"

    def batch_counts(self, batch_id: str, shard: int) -> str:
        return f"{self._at(shard)}:batch:{batch_id}:counts"

    def batches_done(self, shard: int) -> str:
        return f"{self._at(shard)}:batches:done"

    def intake_messages(self, intake_id: str) -> str:
        return f"{self.prefix}:intake:{intake_id}:messages"

    def intake_ids(self, intake_id: str) -> str:
        return f"{self.prefix}:intake:{intake_id}:ids"

    def apikey(self, key_hash: str) -> str:
        return f"{self.prefix}:apikey:{key_hash}"

    def worker(self, worker_id: str) -> str:
        return f"{self.prefix}:worker:{worker_id}"

    def gate(self, server_id: str) -> str:
        return f"{self.prefix}:gate:{{{server_id}}}"

    @property
    def workers(self) -> str:
        return f"{self.prefix}:workers"

    @property
    def apikeys(self) -> str:
        return f"{self.prefix}:apikeys"

    def webhook_outbox(self, shard: int) -> str:
        return f"{self._at(shard)}:webhooks:due"

    def webhook(self, subject_id: str) -> str:
        return f"{self._in(subject_id)}:webhook:{subject_id}"

    def webhook_attempts(self, subject_id: str) -> str:
        return f"{self._in(subject_id)}:webhook:{subject_id}:attempts"

    def webhook_secrets(self, tenant: str) -> str:
        return f"{self.prefix}:tenant:{tenant}:whsec"

    def webhooks_disabled(self, tenant: str, shard: int) -> str:
        return f"{self._at(shard)}:tenant:{tenant}:webhooks:disabled"

    def finished_counts(self, shard: int) -> str:
        return f"{self._at(shard)}:stats:finished"
