"""Chaos checks on real processes: worker subprocesses (``actfleet worker``), a real
redis-server with AOF, the scripted fake model server and bwrap sandboxes (see
``tests/e2e/fleet.py``).
"""

from __future__ import annotations

import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.events import EventType
from agent.models import Status
from tests.conftest import RedisServer
from tests.e2e.fleet import Fleet, assert_each_ran_exactly_once

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.bwrap,
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="needs bubblewrap"),
]


@pytest.fixture
def fleet(redis_server: RedisServer, tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(redis_server, tmp_path)
    yield f
    f.close()


def test_sigkill_of_a_worker_mid_batch_loses_and_repeats_nothing(fleet: Fleet) -> None:
    # given two workers and a batch under way
    victim = fleet.start_worker()
    fleet.start_worker()
    ids = fleet.submit(24)

    # when the first worker is SIGKILLed while it is in the middle of some tasks
    deadline = time.monotonic() + 60
    while True:
        held = fleet.leases_of(victim.pid)
        seqs = [int(fleet.store.r.hget(fleet.store.keys.task(t), "seq") or 0) for t in held]
        if sum(1 for s in seqs if s >= 3) >= 2:
            break
        assert time.monotonic() < deadline, "the victim never got mid-task"
        time.sleep(0.1)
    victim.send_signal(signal.SIGKILL)
    victim.wait()

    # then every task reaches one terminal state, once, with no step lost or repeated,
    # the interrupted ones resumed from their checkpoints by another attempt
    fleet.wait_all_terminal(ids, timeout_s=180)
    assert_each_ran_exactly_once(fleet, ids)
    attempts = {i: fleet.store.get(i).attempt for i in held}  # type: ignore[union-attr]
    assert all(a == 2 for a in attempts.values()), attempts
    # and the metrics (the dead worker's counters included) count each task once
    assert fleet.finished_by_status() == {"completed": 24.0}


def test_redis_kill_and_restart_loses_no_accepted_task(fleet: Fleet) -> None:
    # given two workers and a batch under way, accepted more than an AOF fsync ago
    fleet.start_worker()
    fleet.start_worker()
    ids = fleet.submit(16)
    time.sleep(2.0)

    # when Redis is SIGKILLed and comes back a few seconds later on the same port
    fleet.server.kill()
    time.sleep(3)
    fleet.server.start()

    # then the workers reconnect by themselves and every task finishes exactly once
    fleet.wait_all_terminal(ids, timeout_s=180)
    assert_each_ran_exactly_once(fleet, ids)
    assert all(w.poll() is None for w in fleet.workers)


def test_an_infrastructure_fault_is_retried_and_resumes_after_the_last_step(
    fleet: Fleet,
) -> None:
    # given a model server that fails once in the middle of a task
    fleet.start_worker()
    [task_id] = fleet.submit(1, prompt="flaky")

    # when the task runs
    fleet.wait_all_terminal([task_id], timeout_s=60)

    # then a second attempt finished it from the checkpoint, without repeating turn 1
    assert_each_ran_exactly_once(fleet, [task_id])
    events = fleet.store.events(task_id)
    retrying = [e for e in events if e.type is EventType.RETRYING]
    assert [(e.attempt, e.data["failure_class"]) for e in retrying] == [(1, "llm_error")]
    assert fleet.store.get(task_id).attempt == 2  # type: ignore[union-attr]


def test_a_cancel_request_stops_a_running_execution_within_seconds(fleet: Fleet) -> None:
    # given a task whose code sleeps for two minutes
    fleet.start_worker()
    [task_id] = fleet.submit(1, prompt="sleepy")
    deadline = time.monotonic() + 30
    while not any(e.type is EventType.LLM_REPLY for e in fleet.store.events(task_id)):
        assert time.monotonic() < deadline
        time.sleep(0.1)

    # when the caller asks to cancel it (what POST /v1/tasks/{id}/cancel records)
    fleet.store.r.hset(fleet.store.keys.task(task_id), "cancel_requested", "1")
    asked = time.monotonic()

    # then it ends as cancelled a few seconds later, with the sandbox stopped
    statuses = fleet.wait_all_terminal([task_id], timeout_s=20)
    assert statuses[task_id] is Status.CANCELLED
    assert time.monotonic() - asked < 10
