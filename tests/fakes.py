"""Small fakes of the core's ports, of the store port of a task's attempts, and of the model
gate's store, for tests on fakes."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field, replace
from typing import Any

from agent.events import Event, EventType
from agent.llm import LLMReply, LLMRequest
from agent.models import Result, Status, TaskSpec
from agent.sandbox import ExecResult, PoolStats
from store.records import TaskRecord
from store.worker_store import Appended, Claim, Dropped, EventsBehind
from workers.gateplan import FleetState, GateConfig, Grant, Report, plan
from workers.leases import Lease


class ScriptedLLM:
    """Replies in order; a reply may be a function of the request (to react to it)."""

    def __init__(self, replies: Sequence[str | Callable[[LLMRequest], str] | Exception]) -> None:
        self.replies = list(replies)
        self.requests: list[LLMRequest] = []

    def complete(self, request: LLMRequest) -> LLMReply:
        self.requests.append(request)
        reply = self.replies.pop(0) if self.replies else "I have nothing more to say."
        if isinstance(reply, Exception):
            raise reply
        text = reply(request) if callable(reply) else reply
        return LLMReply(text, "stop", prompt_tokens=10, completion_tokens=5, latency_s=0.5)


@dataclass
class FakeSandbox:
    """Answers executions from a table of code -> result (default: empty output)."""

    results: dict[str, ExecResult] = field(default_factory=dict)
    executed: list[str] = field(default_factory=list)
    closed: bool = False
    raises: Exception | None = None
    pool_hit: bool = False

    def execute(self, code: str, timeout_s: float, max_output_chars: int) -> ExecResult:
        if self.raises is not None:
            raise self.raises
        self.executed.append(code)
        return self.results.get(code, ExecResult(duration_s=0.25))

    def close(self) -> None:
        self.closed = True


@dataclass
class FakeProvider:
    """``agent.sandbox.SandboxProvider`` handing out ``FakeSandbox``es (``make`` builds each,
    given the spec, or raises ``raises``); records what was started and whether the pool and housekeeping ran."""

    make: Callable[[TaskSpec], FakeSandbox] = lambda spec: FakeSandbox()
    backend: str = "fake"
    started: list[tuple[str, FakeSandbox]] = field(default_factory=list)
    pool_started: bool = False
    housekeeping_started: bool = False
    closed: bool = False
    raises: Exception | None = None  # what start raises instead, when set

    def start(self, spec: TaskSpec, task_id: str) -> FakeSandbox:
        if self.raises is not None:
            raise self.raises
        sandbox = self.make(spec)
        self.started.append((task_id, sandbox))
        return sandbox

    def start_pool(self) -> None:
        self.pool_started = True

    def pool_stats(self) -> PoolStats:
        return PoolStats()

    def start_housekeeping(self, is_worker_alive: Callable[[str], bool]) -> int:
        self.housekeeping_started = True
        return 0

    def close(self) -> None:
        self.closed = True


class FakeClock:
    def __init__(self, now: float = 1_000.0, step: float = 0.0) -> None:
        self.now = now
        self.step = step

    def time(self) -> float:
        self.now += self.step
        return self.now


class PythonRegex:
    """A ``RegexEngine`` on Python's ``re``, for tests whose patterns are harmless."""

    def search(self, pattern: str, text: str) -> bool:
        import re

        return re.search(pattern, text) is not None


class MemoryGateStore:
    """``workers.gatestore.GateStore`` in memory: the fleet's rules (``plan``) on one state,
    with a settable clock (ms) and a switch to make syncs fail as if Redis were away."""

    def __init__(self, now_ms: int = 0) -> None:
        self.state: FleetState | None = None
        self.now_ms = now_ms
        self.failing: Exception | None = None
        self.syncs = 0
        self.left: list[str] = []
        self._lock = threading.Lock()

    def sync(self, holder: str, report: Report, config: GateConfig) -> Grant:
        with self._lock:
            if self.failing is not None:
                raise self.failing
            state = self.state or FleetState(float(config.cap))
            self.state, grant = plan(state, holder, report, self.now_ms, config)
            self.syncs += 1
            return grant

    def leave(self, holder: str) -> None:
        with self._lock:
            self.left.append(holder)
            if self.state is not None:
                holders = {h: v for h, v in self.state.holders.items() if h != holder}
                self.state = FleetState(self.state.limit, self.state.epoch, holders)


class InlineExecutor(Executor):
    """Runs what it is given at once, on the caller's thread."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as e:
            future.set_exception(e)
        return future


class LeaseBook:
    """``workers.attempts.Leases`` without a heartbeat thread: a test plays the heartbeat
    (``lose`` and ``cancel`` do what its tick does when it sees that)."""

    def __init__(self) -> None:
        self.held: dict[str, Lease] = {}

    def add(self, lease: Lease) -> None:
        self.held[lease.task_id] = lease

    def remove(self, lease: Lease) -> None:
        if self.held.get(lease.task_id) is lease:
            del self.held[lease.task_id]

    def lose(self, task_id: str) -> None:
        lease = self.held[task_id]
        lease.stop(lease.lost)

    def cancel(self, task_id: str) -> None:
        lease = self.held[task_id]
        lease.stop(lease.cancelled)

    def hand_back(self, task_id: str) -> None:
        lease = self.held[task_id]
        lease.stop(lease.handed_back)


@dataclass
class _Task:
    record: TaskRecord
    lease: str | None = None
    seq: int = 0
    checkpoint: str | None = None
    events: list[Event] = field(default_factory=list)
    released_by: str | None = None
    reclaim_after_s: float | None = None


class MemoryTaskStore:
    """``workers.attempts.AttemptStore`` in memory, with the rules of ``store.scripts``'
    CLAIM, STEP, RELEASE_FOR_RETRY and FINISH (tests/integration/test_worker_store.py holds
    the real ones to them), with the batch counters they keep (``counts``: batch id ->
    counter name -> value, as ``{p}:{s}:batch:{id}:counts`` summed over the shards).
    ``calls`` counts every call: each is one Redis round trip in production (a claim whose
    message names the wrong batch costs two, as CLAIM's -1 reply does). Faults a test can cause: ``steal`` (another attempt took the lease),
    ``vanish`` (the lease expired and nobody took it), ``lose_events`` (Redis lost its
    last writes in a crash)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.tasks: dict[str, _Task] = {}
        self.calls: Counter[str] = Counter()
        self.counts: dict[str, Counter[str]] = {}
        self.clock = clock  # wall clock: the loop's time limits compare with it

    # -- test helpers --------------------------------------------------------------------

    def add(self, record: TaskRecord) -> TaskRecord:
        self.tasks[record.id] = _Task(record)
        if record.batch_id:
            c = self.counts.setdefault(record.batch_id, Counter())
            c[record.status.value] += 1
            c["total"] += 1
        return record

    def _move(self, record: TaskRecord, before: Status, after: Status) -> None:
        if record.batch_id:
            c = self.counts.setdefault(record.batch_id, Counter())
            c[before.value] -= 1
            c[after.value] += 1

    def task(self, task_id: str) -> _Task:
        return self.tasks[task_id]

    def types(self, task_id: str) -> list[EventType]:
        return [e.type for e in self.tasks[task_id].events]

    def steal(self, task_id: str, owner: str = "other-worker/99") -> None:
        self.tasks[task_id].lease = owner

    def vanish(self, task_id: str) -> None:
        self.tasks[task_id].lease = None

    def lose_events(self, task_id: str, n: int = 1) -> None:
        t = self.tasks[task_id]
        t.seq -= n
        del t.events[len(t.events) - n :]

    # -- AttemptStore --------------------------------------------------------------------

    def claim(
        self,
        task_id: str,
        worker_id: str,
        max_attempts: int = 0,
        enqueued_ms: int | None = None,
        batch_id: str | None = None,
    ) -> Claim | Dropped:
        self.calls["claim"] += 1
        t = self.tasks.get(task_id)
        if t is None:
            return Dropped("missing")
        if t.record.status.terminal:
            return Dropped("terminal")
        if t.lease is not None:
            return Dropped("duplicate")
        if (batch_id or None) != t.record.batch_id:
            self.calls["claim"] += 1  # CLAIM names the record's batch; the caller claims again
        if t.record.status is Status.QUEUED:
            self._move(t.record, Status.QUEUED, Status.RUNNING)
        attempt = t.record.attempt + 1
        started_at = t.record.started_at if t.record.started_at is not None else self.clock()
        t.record = replace(t.record, attempt=attempt, status=Status.RUNNING, started_at=started_at)
        t.lease = f"{worker_id}/{attempt}"
        cp = json.loads(t.checkpoint) if t.checkpoint else None
        if t.record.attempts_used <= max_attempts:
            turn = cp.get("turn", 0) if cp else 0
            data = {"worker": worker_id, "resumed": cp is not None}
            t.events.append(Event(EventType.STARTED, turn, attempt, self.clock(), data))
            t.seq += 1
        return Claim(t.record, t.lease, attempt, cp, t.seq, started_at)

    def append(
        self, task_id: str, owner: str, event: Event, seq: int, checkpoint: str | None = None
    ) -> Appended:
        self.calls["append"] += 1
        t = self.tasks[task_id]
        if t.lease != owner:
            return Appended.FENCED
        if t.seq >= seq:
            return Appended.OK
        if t.seq + 1 < seq:
            return Appended.GAP
        t.events.append(event)
        t.seq = seq
        if checkpoint:
            t.checkpoint = checkpoint
        return Appended.OK

    def release(
        self, task_id: str, owner: str, reclaim_after_s: float, batch_id: str | None = None
    ) -> bool:
        self.calls["release"] += 1
        t = self.tasks[task_id]
        if t.lease != owner:
            return False
        if t.record.status is Status.RUNNING and batch_id:
            self._move(t.record, Status.RUNNING, Status.QUEUED)
        t.lease = None
        t.record = replace(t.record, status=Status.QUEUED)
        t.released_by, t.reclaim_after_s = owner, reclaim_after_s
        return True

    def finish(
        self,
        record: TaskRecord,
        owner: str,
        result: Result,
        event: Event,
        last_step: tuple[Event, int] | None = None,
    ) -> str | None:
        self.calls["finish"] += 1
        t = self.tasks[record.id]
        if t.record.status.terminal or t.lease != owner:
            return None
        if last_step is not None:
            step, seq = last_step
            if t.seq + 1 < seq:
                raise EventsBehind(record.id)
            if t.seq < seq:
                t.events.append(step)
                t.seq = seq
        self._move(t.record, t.record.status, result.status)
        if t.record.batch_id:
            c = self.counts[t.record.batch_id]
            c["finished"] += 1
            c["turns"] += result.turns
            c["prompt_tokens"] += result.usage.prompt_tokens
            c["completion_tokens"] += result.usage.completion_tokens
            c["correct"] += result.correct is True
            c["succeeded"] += result.status is Status.COMPLETED and result.correct is not False
        t.record = replace(t.record, status=result.status, result=result, finished_at=self.clock())
        t.events.append(event)  # the terminal event takes no seq: nothing follows it
        t.lease = None
        return f"{len(t.events)}-0"

    def get(self, task_id: str) -> TaskRecord | None:
        self.calls["get"] += 1
        t = self.tasks.get(task_id)
        return t.record if t else None

    def lease_owner(self, task_id: str) -> str | None:
        self.calls["lease_owner"] += 1
        t = self.tasks.get(task_id)
        return t.lease if t else None
