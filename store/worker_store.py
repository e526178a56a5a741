"""The worker's side of the task record: claim, lease, append, finish, sweep.

Every transition is one Lua script (``store.scripts``), so it is atomic, and every write a
worker makes is *fenced* by the owner string ``"{worker_id}/{attempt}"`` it got from
``claim``: once its lease is gone (expired and swept, or taken by a later attempt) its
writes are dropped and the caller learns it from the return value.

Redis outages: every call retries connection errors for ``patience_s`` (long enough for a
Redis restart) before raising ``redis.ConnectionError``. Scripts that are not naturally
idempotent are made so (``STEP`` carries a sequence number), or are harmless to repeat.
A Redis out of memory (``maxmemory``, ``noeviction``) is waited out the same way: it
refuses a script at its first write, so nothing was written, and the step is written once
room comes back (retention expiring old records, the API refusing new work) instead of
being lost; past the patience it is a fault like an outage (the lease lapses and the task
is retried from its checkpoint).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum
from typing import Any, TypeVar

import redis

from agent.events import Event
from agent.models import Result
from agent.text import text_of
from store import scripts
from store.clients import is_cluster, load_scripts, queue_script
from store.intake import MATERIALIZE
from store.keys import DEFAULT_RETENTION, LEASE_TTL_S, STREAM_MAXLEN, Keys, Retention
from store.patience import patiently
from store.records import TaskRecord

T = TypeVar("T")

_REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError, redis.exceptions.OutOfMemoryError)


# FORGET_CHECKPOINT: drop a finished task's checkpoint, sent with its FINISH: nothing
# resumes a finished task, and the checkpoint repeats the trajectory its result holds
# (about half of a finished record). KEYS: 1 task hash. Returns 1 if it dropped one.
FORGET_CHECKPOINT = """
local st = redis.call('HGET', KEYS[1], 'status')
if not st or st == 'queued' or st == 'running' then return 0 end
return redis.call('HDEL', KEYS[1], 'checkpoint')
"""


_PIPELINED = (scripts.RENEW, MATERIALIZE, scripts.CLAIM, scripts.FINISH, FORGET_CHECKPOINT)


class Appended(Enum):
    OK = "ok"
    FENCED = "fenced"  # this owner no longer holds the lease
    GAP = "gap"  # Redis is behind this attempt's events


class EventsBehind(Exception):
    """``finish`` with a last step found Redis holding fewer events than the caller wrote
    (it lost its last writes in a crash); nothing was written."""


@dataclass(frozen=True, slots=True)
class Claim:
    """A delivery this worker now owns, as attempt ``attempt``."""

    record: TaskRecord
    owner: str  # "{worker_id}/{attempt}": the fencing token for every write
    attempt: int
    checkpoint: dict[str, Any] | None  # the loop's state after the last appended step
    seq: int  # events appended so far by all attempts
    started_at: float  # when the first attempt started (wall-clock limits span attempts)


@dataclass(frozen=True, slots=True)
class Dropped:
    """A delivery to acknowledge and forget: ``missing``, ``terminal`` or ``duplicate``."""

    reason: str


@dataclass(frozen=True, slots=True)
class LeaseState:
    held: bool
    cancel_requested: bool
    ended: bool = False  # not held because this attempt finished or released the task


@dataclass(frozen=True, slots=True)
class SweepOutcome:
    requeue: tuple[str, ...] = ()  # enqueue a new message for each, pushed at enqueued_ms
    exhausted: tuple[tuple[str, str], ...] = ()  # (task id, sweeper owner): finish them
    enqueued_ms: int = 0


@dataclass(frozen=True, slots=True)
class LostMessages:
    requeue: tuple[str, ...]  # enqueue a new message for each, pushed at enqueued_ms
    enqueued_ms: int
    queue_empty: bool  # the queue was empty at this look (pass it to the next one)


class WorkerStore:
    """Sync operations on task records for workers. Construction does no I/O."""

    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        *,
        lease_ttl_s: float = LEASE_TTL_S,
        stream_maxlen: int = STREAM_MAXLEN,
        patience_s: float = 120.0,
        clock: Callable[[], float] = time.time,
        broker: redis.Redis | None = None,
        retention: Retention = DEFAULT_RETENTION,
    ) -> None:
        self.r = client
        self.broker = broker or client  # where the task queue's lists are
        self.retention = retention
        self.keys = keys
        self.lease_ttl_s = lease_ttl_s
        self.stream_maxlen = stream_maxlen
        self.patience_s = patience_s
        self.clock = clock
        self._claim = client.register_script(scripts.CLAIM)
        self._renew = client.register_script(scripts.RENEW)
        self._step = client.register_script(scripts.STEP)
        self._release_for_retry = client.register_script(scripts.RELEASE_FOR_RETRY)
        self._sweep = client.register_script(scripts.SWEEP)
        self._finish = client.register_script(scripts.FINISH)
        self._requeue_lost = client.register_script(scripts.REQUEUE_LOST)
        self._handback = client.register_script(scripts.HANDBACK)
        self._materialize = client.register_script(MATERIALIZE)
        self._forget_checkpoint = client.register_script(FORGET_CHECKPOINT)
        # Scripts sent in a pipeline (RENEW, the claim's MATERIALIZE + CLAIM) must be
        # loaded already on a cluster: they are loaded on every master before first use.
        self._loaded = not is_cluster(client)

    # -- helpers -------------------------------------------------------------------------

    def _pipelined(self, op: Callable[[], T]) -> T:
        """``_patient(op)`` for an ``op`` that sends scripts in a pipeline: on a cluster
        they are loaded on every master first (and again after a master forgot them)."""
        if not self._loaded:
            self._patient(lambda: load_scripts(self.r, _PIPELINED))
            self._loaded = True
        try:
            return self._patient(op)
        except redis.exceptions.NoScriptError:
            self._loaded = False  # a master restarted: load them again on the next call
            raise

    def _patient(self, op: Callable[[], T]) -> T:
        """Run ``op``, retrying while Redis is unreachable, for up to ``patience_s``."""
        return patiently(op, self.patience_s)

    def _lease_ms(self) -> int:
        return int(self.lease_ttl_s * 1000)

    def _expiry_ms(self) -> int:
        return int((self.clock() + self.lease_ttl_s) * 1000)

    # -- reads ---------------------------------------------------------------------------

    def get(self, task_id: str) -> TaskRecord | None:
        h = self._patient(lambda: self.r.hgetall(self.keys.task(task_id)))
        return TaskRecord.from_hash(h) if h else None

    def lease_owner(self, task_id: str) -> str | None:
        v = self._patient(lambda: self.r.get(self.keys.lease(task_id)))
        return None if v is None else text_of(v)

    def cancel_requested(self, task_id: str) -> bool:
        v = self._patient(lambda: self.r.hget(self.keys.task(task_id), "cancel_requested"))
        return v in (b"1", "1")

    # -- transitions ---------------------------------------------------------------------

    def claim(
        self,
        task_id: str,
        worker_id: str,
        max_attempts: int = 0,
        enqueued_ms: int | None = None,
        batch_id: str | None = None,
    ) -> Claim | Dropped:
        """Take the lease for a delivery of ``task_id`` (attempt + 1), or say why not.

        An attempt within ``max_attempts`` also gets its ``task.started`` event appended
        (``Claim.seq`` counts it); one beyond gets none, to be finished as exhausted.
        ``enqueued_ms``: when the delivered message was pushed (it moves the queue's taken
        mark, see ``requeue_lost``); None when the message does not say. ``batch_id``: the
        batch the message names; a wrong or missing one costs a second round trip (the
        script names the right one), never a wrong count."""
        k = self.keys
        now = self.clock()
        shard = k.shard(task_id)
        started = scripts.started_parts(worker_id, now)

        def op(batch: str) -> Any:
            names = [
                k.task(task_id),
                k.lease(task_id),
                k.running(shard),
                k.events(task_id),
                k.queued(shard),
                k.queue_taken(shard),
            ]
            if batch:
                names.append(k.batch_counts(batch, shard))
            # The stream starts with the task's task.queued event (store.intake), in the
            # same round trip; it is idempotent, so a retry after a lost reply is harmless.
            pipe = self.r.pipeline(transaction=False)
            queue_script(self._materialize, pipe, [k.task(task_id), k.events(task_id)], [])
            queue_script(
                self._claim,
                pipe,
                names,
                [
                    worker_id,
                    repr(now),
                    self._lease_ms(),
                    self._expiry_ms(),
                    task_id,
                    max_attempts,
                    self.stream_maxlen,
                    int(enqueued_ms or 0),
                    batch,
                    *started,
                ],
            )
            return pipe.execute()[1]

        out = self._pipelined(lambda: op(batch_id or ""))
        if int(out[0]) == -1:  # the record's batch is not the message's: claim with it
            record_batch = text_of(out[1])
            out = self._pipelined(lambda: op(record_batch))
        if int(out[0]) == 0:
            return Dropped(text_of(out[1]))
        attempt = int(out[0])
        fields = out[4]  # the record as the claim left it, flat: [field, value, ...]
        cp = text_of(out[1])
        return Claim(
            record=TaskRecord.from_hash(dict(zip(fields[::2], fields[1::2], strict=True))),
            owner=f"{worker_id}/{attempt}",
            attempt=attempt,
            checkpoint=json.loads(cp) if cp else None,
            seq=int(out[2]),
            started_at=float(out[3]),
        )

    def renew(self, leases: Iterable[tuple[str, str, int]]) -> dict[str, LeaseState]:
        """Renew many leases in one round trip. ``leases``: (task id, owner, attempt)."""
        items = list(leases)
        if not items:
            return {}
        k = self.keys

        def op() -> list[Any]:
            pipe = self.r.pipeline(transaction=False)
            expiry = self._expiry_ms()
            for task_id, owner, attempt in items:
                queue_script(
                    self._renew,
                    pipe,
                    [k.task(task_id), k.lease(task_id), k.running(k.shard(task_id))],
                    [owner, self._lease_ms(), expiry, task_id, attempt],
                )
            return pipe.execute()

        replies = self._pipelined(op)
        return {
            task_id: LeaseState(
                held=int(rep[0]) == 1,
                cancel_requested=text_of(rep[1]) == "1",
                ended=int(rep[0]) == 2,
            )
            for (task_id, _, _), rep in zip(items, replies, strict=True)
        }

    def append(
        self, task_id: str, owner: str, event: Event, seq: int, checkpoint: str | None = None
    ) -> Appended:
        """Append ``event`` as the task's ``seq``-th event (with the checkpoint after it).

        Appending the same ``seq`` twice is a no-op (``OK``). ``GAP`` means Redis holds
        fewer events than the caller wrote (it lost its last writes in a crash): the caller
        should hand the task back so the next attempt resumes from what was kept.
        """
        k = self.keys
        out = self._patient(
            lambda: self._step(
                keys=[k.task(task_id), k.lease(task_id), k.events(task_id)],
                args=[owner, event.to_json(), self.stream_maxlen, checkpoint or "", seq],
            )
        )
        if out is None:
            return Appended.FENCED
        return Appended.GAP if out == 0 else Appended.OK

    def release(
        self, task_id: str, owner: str, reclaim_after_s: float, batch_id: str | None = None
    ) -> bool:
        """Hand the task back unfinished; the sweeper re-enqueues it after
        ``reclaim_after_s`` (plus the sweep grace) unless a new delivery claims it first.
        ``batch_id``: the task's batch (its record's), whose counts move with it."""
        k = self.keys
        at_ms = int((self.clock() + reclaim_after_s) * 1000)
        shard = k.shard(task_id)
        names = [k.task(task_id), k.lease(task_id), k.running(shard)]
        if batch_id:
            names.append(k.batch_counts(batch_id, shard))
        out = self._patient(
            lambda: self._release_for_retry(keys=names, args=[owner, at_ms, task_id])
        )
        return int(out) == 1

    def hand_back(self, task_id: str, owner: str, batch_id: str | None = None) -> int | None:
        """Give an unfinished task back to the queue at its checkpoint, without using an
        attempt (a worker that stops). Returns the push time (unix ms) the caller's new
        message must carry, or None if ``owner`` is fenced out. Raises Redis errors.
        ``batch_id``: the task's batch (its record's), whose counts move with it."""
        k = self.keys
        now_ms = int(self.clock() * 1000)
        shard = k.shard(task_id)
        names = [k.task(task_id), k.lease(task_id), k.running(shard), k.queued(shard)]
        if batch_id:
            names.append(k.batch_counts(batch_id, shard))
        # Not patient: a worker that stops while Redis is down must not wait out the
        # patience for each task; their leases expire and a sweeper requeues them.
        out = self._handback(keys=names, args=[owner, task_id, now_ms])
        return now_ms if int(out) == 1 else None

    def worker_alive(self, worker_id: str) -> bool:
        """Has ``worker_id`` sent a heartbeat within ``WORKER_TTL_S``?"""
        return bool(self.r.exists(self.keys.worker(worker_id)))

    def finish(
        self,
        record: TaskRecord,
        owner: str,
        result: Result,
        event: Event,
        last_step: tuple[Event, int] | None = None,
    ) -> str | None:
        """Move the task to ``result.status`` once. Returns the terminal event's stream id,
        or None if it was already terminal or this owner is fenced out.

        ``last_step`` (event, seq): the task's last step, not yet appended, written just
        before the terminal event (as ``append`` would: once per seq; ``EventsBehind`` on a
        gap)."""
        if not result.status.terminal:
            raise ValueError(f"finish needs a terminal status, got {result.status}")
        keys_, args = scripts.finish_call(
            self.keys,
            record.id,
            record.tenant,
            record.batch_id,
            owner=owner,
            result=result,
            event=event,
            finished_at=self.clock(),
            stream_maxlen=self.stream_maxlen,
            last_step=last_step,
            retention=self.retention,
        )

        def op() -> Any:
            pipe = self.r.pipeline(transaction=False)
            queue_script(self._finish, pipe, keys_, args)
            queue_script(self._forget_checkpoint, pipe, [self.keys.task(record.id)], [])
            return pipe.execute()[0]

        out = self._pipelined(op)
        if isinstance(out, bytes | str):
            return text_of(out)
        if out == -3:
            raise EventsBehind(record.id)
        return None

    def sweep(
        self, sweeper_id: str, max_attempts: int, grace_s: float = 10.0, limit: int = 100
    ) -> SweepOutcome:
        """Find tasks whose lease expired more than ``grace_s`` ago (the grace lets a live
        worker take its lease back after a Redis restart first). Each is either handed
        back to the queue or, when it used up ``max_attempts``, given to the sweeper to
        finish as ``error``/``worker_lost``. At most ``limit`` per shard per call."""
        k = self.keys
        now = self.clock()
        expired_ms = int((now - grace_s) * 1000)
        now_ms = int(now * 1000)
        ids = self._each_shard(lambda s: (k.running(s), expired_ms), limit)
        requeue: list[str] = []
        exhausted: list[tuple[str, str]] = []
        batches = self._batch_ids([text_of(i) for i in ids])  # a task's batch never changes
        for raw in ids:
            task_id = text_of(raw)

            def op(t: str = task_id) -> Any:
                shard = k.shard(t)
                names = [k.task(t), k.lease(t), k.running(shard), k.queued(shard)]
                if batches.get(t):
                    names.append(k.batch_counts(batches[t], shard))
                return self._sweep(
                    keys=names,
                    args=[expired_ms, max_attempts, t, sweeper_id, self._lease_ms(), now_ms],
                )

            out = text_of(self._patient(op))
            if out == "requeue":
                requeue.append(task_id)
            elif out == "exhausted":
                owner = self.lease_owner(task_id)
                if owner:
                    exhausted.append((task_id, owner))
        return SweepOutcome(tuple(requeue), tuple(exhausted), now_ms)

    def _each_shard(self, index: Callable[[int], tuple[str, int]], limit: int) -> list[Any]:
        """The ids scored up to a cutoff in one index per shard (``index(shard)`` gives its
        name and cutoff), at most ``limit`` of each, in one round trip."""

        def op() -> list[Any]:
            pipe = self.r.pipeline(transaction=False)
            for shard in self.keys.shard_ids:
                name, cutoff = index(shard)
                pipe.zrangebyscore(name, "-inf", cutoff, start=0, num=limit)
            return pipe.execute()

        return [i for ids in self._patient(op) for i in ids]

    def _batch_ids(self, task_ids: list[str]) -> dict[str, str]:
        """Each task's batch id ("" for none), in one round trip."""
        if not task_ids:
            return {}

        def op() -> list[Any]:
            pipe = self.r.pipeline(transaction=False)
            for t in task_ids:
                pipe.hget(self.keys.task(t), "batch_id")
            return pipe.execute()

        return {
            t: text_of(b) if b else "" for t, b in zip(task_ids, self._patient(op), strict=True)
        }

    def requeue_lost(
        self, grace_s: float, queues: Iterable[str], queue_was_empty: bool, limit: int = 100
    ) -> LostMessages:
        """Queued tasks whose message is gone; each is given a new push time, and the
        caller pushes its new message.

        The queued index holds each waiting task with the push time of its latest message.
        The queue is FIFO, so a message pushed more than ``grace_s`` before the latest one
        a worker has taken (the taken mark) should have been taken as well; and with the
        queue empty (``queues``' lists, now and at the caller's previous look:
        ``queue_was_empty``), any message pushed more than ``grace_s`` ago should have
        been. A task behind a backlog is neither: its message waits, and nothing pushed
        after it was taken yet. The grace covers a message between a worker's pop and its
        claim, and a task whose record the API wrote but whose message it has not pushed
        yet. A message that was merely slow after all gets a duplicate, which the claim
        drops."""
        k = self.keys
        names = list(queues)
        now_ms = int(self.clock() * 1000)

        def look(client: redis.Redis, op: Callable[[Any], Any], over: Iterable[Any]) -> list[Any]:
            pipe = client.pipeline(transaction=False)
            for item in over:
                op(pipe)(item)
            return pipe.execute()

        lengths = self._patient(lambda: look(self.broker, lambda p: p.llen, names))
        marks = self._patient(
            lambda: look(self.r, lambda p: p.get, [k.queue_taken(s) for s in k.shard_ids])
        )
        empty = sum(int(n) for n in lengths) == 0
        taken = max(int(v or 0) for v in marks)  # the queue's mark: the latest shard's
        if empty and queue_was_empty:
            cutoff = now_ms - int(grace_s * 1000)
        else:
            cutoff = min(now_ms, taken) - int(grace_s * 1000)
        ids = self._each_shard(lambda s: (k.queued(s), cutoff), limit)
        requeue = []
        for raw in ids:
            task_id = text_of(raw)

            def op(t: str = task_id) -> Any:
                return self._requeue_lost(
                    keys=[k.task(t), k.lease(t), k.queued(k.shard(t))], args=[t, cutoff, now_ms]
                )

            if text_of(self._patient(op)) == "requeue":
                requeue.append(task_id)
        return LostMessages(tuple(requeue), now_ms, empty)

    def events(self, task_id: str) -> list[Event]:
        """The task's stream, oldest first (tests, tools)."""
        entries: Any = self._patient(lambda: self.r.xrange(self.keys.events(task_id)))
        out = []
        for _, fields in entries or ():
            raw = fields.get(b"e", fields.get("e"))
            out.append(Event.from_dict(json.loads(text_of(raw))))
        return out
