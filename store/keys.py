"""Every name that crosses a process boundary through Redis, in one place.

Layout (``{p}`` is the configurable prefix, ``af`` by default)::

    {p}:task:{id}              hash    the task record (see records.TaskRecord)
    {p}:events:{id}            stream  the task's events; entry field "e" = Event JSON; it
                                       starts when the task does, with its task.queued
                                       event (id 0-1), kept until then in the record's
                                       "queued_event" field (store.intake.MATERIALIZE)
    {p}:lease:{id}             string  "{worker_id}/{attempt}" with a TTL: who runs it now
    {p}:running                zset    task id -> lease expiry (unix ms); the sweeper's index
    {p}:queued                 zset    task id -> when its latest message was pushed (unix
                                       ms), while it waits for a worker: the index the
                                       sweeper finds lost messages in (CLAIM removes it)
    {p}:queue:taken_ms         string  the latest push time (unix ms) of a message a worker
                                       has taken: the queue is FIFO, so a message pushed
                                       well before it should have been taken too
    {p}:tenant:{t}:tasks       zset    task id -> created_at; GET /v1/tasks
    {p}:tenant:{t}:active      string  count of the tenant's non-terminal tasks
    {p}:batch:{id}             hash    the batch record
    {p}:batch:{id}:tasks       list    the batch's task ids, in input order
    {p}:batch:{id}:counts      hash    terminal status -> count
    {p}:intake:{id}:messages   list    a submission's broker messages, staged until it
                                       commits (then moved to the queue); with a TTL
    {p}:intake:{id}:ids        list    a single-task submission's ids, staged likewise (a
                                       batch stages its ids in {p}:batch:{id}:tasks)
    {p}:apikey:{sha256}        hash    tenant, name, created_at (the key itself is never stored)
    {p}:apikeys                zset    sha256 -> created_at: every key, for `keys list`
    {p}:stats:finished         hash    terminal status -> count, fleet-wide (FINISH bumps it)
    {p}:webhooks:due           zset    task or batch id -> when its webhook's next attempt is
                                       due (unix s). FINISH adds a finished task with a webhook,
                                       and a batch with one when its last task finishes; a
                                       claim moves it a lease ahead; a final outcome removes it
    {p}:webhook:{id}           hash    the delivery of that task's or batch's webhook: event,
                                       url, tenant, state, attempts, lease, deadline, ...
    {p}:webhook:{id}:attempts  list    one JSON per attempt (at, status_code or error,
                                       latency_ms, outcome), oldest first
    {p}:tenant:{t}:whsec       hash    the tenant's signing secrets: current, previous,
                                       previous_until (unix s), rotated_at
    {p}:tenant:{t}:webhooks:disabled  hash  endpoint URL -> when it answered 410 Gone
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
"""

from __future__ import annotations

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

    def task(self, task_id: str) -> str:
        return f"{self.prefix}:task:{task_id}"

    def events(self, task_id: str) -> str:
        return f"{self.prefix}:events:{task_id}"

    def lease(self, task_id: str) -> str:
        return f"{self.prefix}:lease:{task_id}"

    @property
    def running(self) -> str:
        return f"{self.prefix}:running"

    @property
    def queued(self) -> str:
        return f"{self.prefix}:queued"

    @property
    def queue_taken(self) -> str:
        return f"{self.prefix}:queue:taken_ms"

    def tenant_tasks(self, tenant: str) -> str:
        return f"{self.prefix}:tenant:{tenant}:tasks"

    def tenant_active(self, tenant: str) -> str:
        return f"{self.prefix}:tenant:{tenant}:active"

    def batch(self, batch_id: str) -> str:
        return f"{self.prefix}:batch:{batch_id}"

    def batch_tasks(self, batch_id: str) -> str:
        return f"{self.prefix}:batch:{batch_id}:tasks"

    def batch_counts(self, batch_id: str) -> str:
        return f"{self.prefix}:batch:{batch_id}:counts"

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

    @property
    def webhook_outbox(self) -> str:
        return f"{self.prefix}:webhooks:due"

    def webhook(self, subject_id: str) -> str:
        return f"{self.prefix}:webhook:{subject_id}"

    def webhook_attempts(self, subject_id: str) -> str:
        return f"{self.prefix}:webhook:{subject_id}:attempts"

    def webhook_secrets(self, tenant: str) -> str:
        return f"{self.prefix}:tenant:{tenant}:whsec"

    def webhooks_disabled(self, tenant: str) -> str:
        return f"{self.prefix}:tenant:{tenant}:webhooks:disabled"

    @property
    def finished_counts(self) -> str:
        return f"{self.prefix}:stats:finished"
