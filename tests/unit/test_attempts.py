"""A task's attempt (``workers.attempts.Attempts``) on fakes: an in-memory store with the
scripts' rules, a scripted model, fake sandboxes and a lease book played by the test as the
heartbeat would. One test per way an attempt ends: done, dropped, fenced, regressed,
infrastructure fault (retried with backoff, then given up), cancel, lease lost, hand-back.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import pytest

from agent.errors import LLMRejected, SandboxError
from agent.events import EventType
from agent.llm import LLMRequest
from agent.models import FailureClass, Status, TaskSpec
from agent.sandbox import ExecResult
from config.settings import Settings
from store.keys import LEASE_TTL_S
from store.records import TaskRecord
from tests.fakes import (
    FakeProvider,
    FakeSandbox,
    InlineExecutor,
    LeaseBook,
    MemoryTaskStore,
    ScriptedLLM,
)
from workers.attempts import Attempts, AttemptStore, Done, RetryAfter

TASK = "task_1"
CODE = "<execute>print(6*7)</execute>"
ANSWER = "<solution>42</solution>"
Reply = str | Callable[[LLMRequest], str] | Exception


class World:
    """One worker's attempts over one in-memory store."""

    def __init__(
        self,
        replies: Sequence[Reply],
        store: AttemptStore | None = None,
        put: Callable[[TaskRecord], object] | None = None,
        **settings: object,
    ) -> None:
        """On ``store`` (default: a ``MemoryTaskStore``), where ``put`` stores a new record
        as the API would."""
        fake = MemoryTaskStore()
        self.store: Any = store or fake
        self.put = put or fake.add
        self.llm = ScriptedLLM(replies)
        results = {"print(6*7)": ExecResult(stdout="42\n", duration_s=0.1)}
        self.provider = FakeProvider(make=lambda spec: FakeSandbox(dict(results)))
        self.leases = LeaseBook()
        self.finished: list[str] = []
        config = {"max_attempts": 3, "retry_backoff_s": 2.0, "retry_backoff_max_s": 60.0}
        self.attempts = Attempts(
            Settings(**{**config, **settings}),  # type: ignore[arg-type]
            self.store,
            self.llm,
            self.provider,
            self.leases,
            InlineExecutor(),
            worker_id="w1",
            on_finished=self.finished.append,
        )

    def add(self, **spec: object) -> TaskRecord:
        raw = {"prompt": "What is 6*7?", **spec}
        record = TaskRecord(id=TASK, tenant="acme", spec=TaskSpec.from_dict(raw))
        self.put(record)
        return record

    def run(self) -> Done | RetryAfter:
        return self.attempts.run(TASK)

    @property
    def record(self) -> TaskRecord:
        return self.store.task(TASK).record

    def types(self) -> list[EventType]:
        return self.store.types(TASK)


def then(effect: Callable[[], object], reply: str) -> Callable[[LLMRequest], str]:
    """A model reply that, while the model 'thinks', makes ``effect`` happen."""

    def answer(request: LLMRequest) -> str:
        effect()
        return reply

    return answer


# -- done ------------------------------------------------------------------------------


def test_a_task_that_answers_is_finished_with_one_append_per_step_and_nothing_more() -> None:
    # given a task with a webhook whose model runs code, then answers
    w = World([CODE, ANSWER])
    w.add(webhook={"url": "https://example.invalid/hook"})
    # when the delivery runs
    out = w.run()
    # then it is done, its record completed, every step in its stream in order
    assert out == Done("finished")
    assert w.record.status is Status.COMPLETED and w.record.result is not None
    assert w.record.result.answer == "42" and w.record.result.attempt == 1
    assert w.types() == [
        EventType.STARTED,
        EventType.LLM_REPLY,
        EventType.EXEC_RESULT,
        EventType.LLM_REPLY,
        EventType.FINISHED,
    ]
    # and the hot path made one store call per step: the claim wrote task.started, the
    # answering reply rode along with FINISH, and nothing else was read or written
    assert w.store.calls == Counter(claim=1, append=2, finish=1)
    assert w.finished == [TASK]  # its webhook was scheduled, once
    assert w.provider.started[0][1].closed and w.leases.held == {}


def test_a_task_without_a_webhook_schedules_none() -> None:
    w = World([ANSWER])
    w.add()
    assert w.run() == Done("finished")
    assert w.finished == []


# -- dropped ---------------------------------------------------------------------------


def test_a_delivery_of_a_missing_task_is_dropped_without_a_sandbox() -> None:
    w = World([ANSWER])
    assert w.run() == Done("dropped:missing")
    assert w.provider.started == [] and w.llm.requests == []


def test_a_delivery_of_a_finished_task_is_dropped() -> None:
    w = World([ANSWER, ANSWER])
    w.add()
    w.run()
    assert w.run() == Done("dropped:terminal")
    assert len(w.provider.started) == 1 and w.types().count(EventType.FINISHED) == 1


def test_a_duplicate_delivery_while_an_attempt_holds_the_lease_is_dropped() -> None:
    w = World([ANSWER])
    w.add()
    w.store.steal(TASK, "w2/1")  # a live attempt on another worker
    assert w.run() == Done("dropped:duplicate")
    assert w.record.status is Status.QUEUED and w.types() == []


# -- fenced ----------------------------------------------------------------------------


def test_an_attempt_whose_lease_another_attempt_took_stops_writing_and_is_done() -> None:
    # given another attempt takes the lease while this one waits for the model
    w = World([then(lambda: w.store.steal(TASK, "w2/2"), CODE), ANSWER])
    w.add()
    # when this attempt tries to append the model's reply
    out = w.run()
    # then it writes nothing more, leaves the task to the owner, and acknowledges
    assert out == Done("fenced")
    assert w.types() == [EventType.STARTED]
    assert w.record.status is Status.RUNNING and w.store.task(TASK).lease == "w2/2"
    assert w.provider.started[0][1].closed and len(w.llm.requests) == 1


def test_a_fenced_attempt_of_a_task_that_finished_meanwhile_is_done() -> None:
    def finished_elsewhere() -> None:
        t = w.store.task(TASK)
        t.record, t.lease = replace(t.record, status=Status.COMPLETED), None

    w = World([then(finished_elsewhere, CODE)])
    w.add()
    assert w.run() == Done("fenced")


# -- regressed -------------------------------------------------------------------------


def test_an_attempt_that_finds_redis_behind_its_writes_hands_the_task_back_to_resume() -> None:
    # given Redis loses this attempt's last write (task.started) in a crash mid-turn
    w = World([then(lambda: w.store.lose_events(TASK), CODE), ANSWER])
    w.add()
    # when it appends its next step
    out = w.run()
    # then it gives the task back at once, to resume from what Redis kept
    assert out == RetryAfter(0.5, "state_regressed")
    t = w.store.task(TASK)
    assert t.lease is None and t.record.status is Status.QUEUED
    assert t.released_by == "w1/1" and t.reclaim_after_s == LEASE_TTL_S
    assert w.types() == []


def test_an_answer_that_finds_redis_behind_is_not_finished_but_handed_back() -> None:
    w = World([then(lambda: w.store.lose_events(TASK), ANSWER)])
    w.add()
    assert w.run() == RetryAfter(0.5, "state_regressed")
    assert w.record.status is Status.QUEUED and w.record.result is None


def test_a_regressed_attempt_that_lost_its_lease_too_is_fenced() -> None:
    def crash() -> None:
        w.store.lose_events(TASK)
        w.store.steal(TASK, "w2/2")

    w = World([then(crash, ANSWER)])
    w.add()
    assert w.run() == Done("fenced")


# -- infrastructure fault --------------------------------------------------------------


def test_an_infrastructure_fault_is_retried_with_backoff_then_given_up() -> None:
    # given a sandbox that cannot start, and three attempts allowed
    w = World([CODE, CODE, CODE])
    w.provider.raises = SandboxError("no sandbox today")
    w.add()
    # when three deliveries run
    first, second, third = w.run(), w.run(), w.run()
    # then the first two are retried after the backoff's doubling delays
    assert first == RetryAfter(2.0, "sandbox_error")
    assert second == RetryAfter(4.0, "sandbox_error")
    retrying = [e for e in w.store.task(TASK).events if e.type is EventType.RETRYING]
    assert [(e.attempt, e.data["delay_s"], e.data["next_attempt"]) for e in retrying] == [
        (1, 2.0, 2),
        (2, 4.0, 3),
    ]
    assert "no sandbox today" in retrying[0].data["error"]
    # (each released the task for the sweeper to reclaim should its retry message be lost)
    assert w.store.calls["release"] == 2
    # and the last attempt ends the task as an error
    assert third == Done("finished")
    assert w.record.status is Status.ERROR and w.record.result is not None
    assert w.record.result.failure_class is FailureClass.SANDBOX_ERROR
    assert w.record.result.attempt == 3
    assert w.types()[-1] is EventType.FINISHED


def test_the_retry_delay_is_capped() -> None:
    w = World([CODE] * 6, max_attempts=6, retry_backoff_s=2.0, retry_backoff_max_s=5.0)
    w.provider.raises = SandboxError("down")
    w.add()
    delays = [w.run() for _ in range(4)]
    assert [d.delay_s for d in delays if isinstance(d, RetryAfter)] == [2.0, 4.0, 5.0, 5.0]


def test_a_fault_that_retrying_cannot_mend_ends_the_task_at_once() -> None:
    w = World([LLMRejected("model 'nope' does not exist")])
    w.add()
    assert w.run() == Done("finished")
    assert w.record.status is Status.ERROR and w.record.result is not None
    assert w.record.result.failure_class is FailureClass.LLM_REJECTED
    assert w.store.calls["release"] == 0


def test_a_delivery_beyond_the_attempt_budget_ends_the_task_as_worker_lost() -> None:
    # given a task whose workers died on each of its three attempts
    w = World([ANSWER])
    rec = w.add()
    w.store.task(TASK).record = replace(rec, attempt=3)
    # when a fourth delivery comes
    assert w.run() == Done("finished")
    # then it is not run but ended, without a task.started
    assert w.llm.requests == []
    assert w.record.status is Status.ERROR and w.record.result is not None
    assert w.record.result.failure_class is FailureClass.WORKER_LOST
    assert w.types() == [EventType.FINISHED]


# -- cancel ----------------------------------------------------------------------------


def test_a_task_cancelled_before_its_delivery_ends_cancelled_without_a_model_call() -> None:
    w = World([ANSWER])
    rec = w.add()
    w.store.task(TASK).record = replace(rec, cancel_requested=True)
    assert w.run() == Done("finished")
    assert w.record.status is Status.CANCELLED and w.llm.requests == []
    assert w.types() == [EventType.STARTED, EventType.FINISHED]


def test_a_cancel_seen_mid_run_stops_the_loop_and_ends_the_task_cancelled() -> None:
    # given the heartbeat sees a cancel request while the model writes code
    w = World([then(lambda: w.leases.cancel(TASK), CODE), ANSWER])
    w.add()
    # when the attempt goes on
    out = w.run()
    # then the code is not run, the sandbox is closed, and the task ends cancelled
    assert out == Done("finished")
    assert w.record.status is Status.CANCELLED and w.record.result is not None
    assert w.record.result.failure_class is FailureClass.CANCELLED
    assert w.provider.started[0][1].executed == [] and w.provider.started[0][1].closed
    assert len(w.llm.requests) == 1


# -- lease lost ------------------------------------------------------------------------


def test_a_lease_that_vanished_stops_the_attempt_and_resends_the_task() -> None:
    # given the lease expires (nobody took it) and the heartbeat says it is lost
    def lost() -> None:
        w.store.vanish(TASK)
        w.leases.lose(TASK)

    w = World([then(lost, CODE), ANSWER])
    w.add()
    # when the attempt reaches its next check
    out = w.run()
    # then it writes nothing more and asks for a new delivery soon
    assert out == RetryAfter(1.0, "lease_vanished")
    assert w.types() == [EventType.STARTED] and w.record.status is Status.RUNNING
    assert w.provider.started[0][1].closed


def test_a_lease_lost_to_another_attempt_ends_this_one_quietly() -> None:
    def taken() -> None:
        w.store.steal(TASK, "w2/2")
        w.leases.lose(TASK)

    w = World([then(taken, CODE), ANSWER])
    w.add()
    assert w.run() == Done("fenced")
    assert w.types() == [EventType.STARTED]


# -- hand-back -------------------------------------------------------------------------


def test_an_attempt_handed_back_by_a_stopping_worker_ends_without_writing() -> None:
    def stopping() -> None:  # WorkerRuntime.drain gave the task back to the queue
        w.store.vanish(TASK)
        w.leases.hand_back(TASK)

    w = World([then(stopping, CODE), ANSWER])
    w.add()
    assert w.run() == Done("handed_back")
    assert w.types() == [EventType.STARTED] and w.store.calls["finish"] == 0


@pytest.mark.parametrize("turns", [1, 3, 6])
def test_each_turn_costs_two_appends_whatever_the_task_length(turns: int) -> None:
    w = World([CODE] * (turns - 1) + [ANSWER])
    w.add(limits={"max_turns": 10})
    assert w.run() == Done("finished")
    assert w.store.calls == Counter(claim=1, append=2 * (turns - 1), finish=1)


def test_a_batch_task_moves_through_its_batch_counts_in_the_calls_it_already_makes() -> None:
    # given a task of a batch whose sandbox fails once, then starts
    w = World([CODE, ANSWER])
    record = TaskRecord(
        id=TASK, tenant="acme", spec=TaskSpec.from_dict({"prompt": "6*7?"}), batch_id="b1"
    )
    w.put(record)
    w.provider.raises = SandboxError("not yet")
    # when its message (naming the batch) is delivered, retried, delivered again
    assert isinstance(w.attempts.run(TASK, None, "b1"), RetryAfter)
    assert w.store.counts["b1"]["queued"] == 1 and w.store.counts["b1"]["running"] == 0
    w.provider.raises = None
    assert w.attempts.run(TASK, None, "b1") == Done("finished")
    # then the counts say it completed, with its turns, and nothing is left queued or running
    c = w.store.counts["b1"]
    assert (c["queued"], c["running"], c["completed"], c["finished"]) == (0, 0, 1, 1)
    assert c["turns"] == w.record.result.turns  # type: ignore[union-attr]
    # and each claim was one round trip, because the message named the batch
    assert w.store.calls["claim"] == 2


def test_a_message_that_names_no_batch_costs_the_claim_a_second_round_trip() -> None:
    w = World([ANSWER])
    w.put(
        TaskRecord(id=TASK, tenant="acme", spec=TaskSpec.from_dict({"prompt": "?"}), batch_id="b1")
    )
    assert w.attempts.run(TASK) == Done("finished")
    assert w.store.calls["claim"] == 2
    assert w.store.counts["b1"]["completed"] == 1
