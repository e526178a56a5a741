"""Chaos checks on real processes: worker subprocesses (``actfleet worker``), a real
redis-server with AOF, the scripted fake model server and bwrap sandboxes.

Each task takes four turns (three cells that build up ``acc``, then the answer), so a
task that is resumed on another worker only answers ``3`` if its sandbox state was
rebuilt from the checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

from actfleet.settings import Settings
from agent.events import EventType
from agent.models import Status, TaskSpec
from store.keys import Keys
from store.tasks import TaskStore, new_record
from tests.conftest import RedisServer, free_port
from workers.celery_app import enqueue, make_celery

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.bwrap,
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="needs bubblewrap"),
]

TURN_LATENCY_S = 0.6
SCRIPT = [
    {"when": {"prompt_regex": "flaky", "turn": 2}, "status": 503, "error": "down", "times": 1},
    {
        "when": {"prompt_regex": "sleepy"},
        "reply": "<execute>\nimport time\ntime.sleep(120)\n</execute>",
    },
    {"when": {"turn": 1}, "reply": "<execute>\nacc = 1\nprint('acc', acc)\n</execute>"},
    {"when": {"turn": 2}, "reply": "<execute>\nacc += 1\nprint('acc', acc)\n</execute>"},
    {"when": {"turn": 3}, "reply": "<execute>\nacc += 1\nprint('acc', acc)\n</execute>"},
    {"when": {"turn": 4, "last_regex": "acc (?P<out>\\d+)"}, "reply": "<solution>{out}</solution>"},
]
STEP_TYPES = (EventType.LLM_REPLY, EventType.EXEC_RESULT)


class Fleet:
    """Workers, the fake model server and a store client around one redis-server."""

    def __init__(self, server: RedisServer, tmp: Path) -> None:
        self.server = server
        self.tmp = tmp
        self.metrics_dir = tmp / "metrics"
        self.metrics_dir.mkdir()
        self.store = TaskStore(redis.Redis.from_url(server.url), Keys("af"))
        self.celery = make_celery(Settings(redis_url=server.url))
        self.workers: list[subprocess.Popen[bytes]] = []
        script = tmp / "script.json"
        script.write_text(json.dumps(SCRIPT))
        llm_port = free_port()
        self.fake_llm = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "actfleet",
                "fake-llm",
                "--script",
                str(script),
                "--port",
                str(llm_port),
                "--latency",
                str(TURN_LATENCY_S),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.env = dict(
            os.environ,
            ACTFLEET_REDIS_URL=server.url,
            OPENAI_BASE_URL=f"http://127.0.0.1:{llm_port}/v1",
            PROMETHEUS_MULTIPROC_DIR=str(self.metrics_dir),
            ACTFLEET_RETRY_BACKOFF_S="0.5",
            ACTFLEET_LLM_MAX_RETRIES="0",
        )

    def start_worker(self, concurrency: int = 6) -> subprocess.Popen[bytes]:
        n = len(self.workers)
        log = (self.tmp / f"worker-{n}.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "actfleet", "worker", "--concurrency", str(concurrency)],
            env=self.env,
            stdout=log,
            stderr=log,
        )
        self.workers.append(proc)
        return proc

    def submit(self, n: int, prompt: str = "count") -> list[str]:
        ids = []
        for i in range(n):
            rec = new_record(
                TaskSpec.from_dict({"prompt": f"{prompt} #{i}", "expected": {"answer": "3"}})
            )
            self.store.create(rec)
            enqueue(self.celery, rec.id)
            ids.append(rec.id)
        return ids

    def leases_of(self, pid: int) -> list[str]:
        """Task ids whose lease a worker process holds now."""
        out = []
        for key in self.store.r.scan_iter("af:lease:*"):
            owner = self.store.r.get(key)
            if owner is not None and f"-{pid}-" in owner.decode():
                out.append(key.decode().rsplit(":", 1)[1])
        return out

    def wait_all_terminal(self, ids: list[str], timeout_s: float) -> dict[str, Status]:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                statuses = {i: self.store.get(i).status for i in ids}  # type: ignore[union-attr]
            except redis.ConnectionError:
                statuses = {}
            if statuses and all(s.terminal for s in statuses.values()):
                return statuses
            if time.monotonic() > deadline:
                pending = {i: s for i, s in statuses.items() if not s.terminal}
                pytest.fail(f"{len(pending)} tasks not terminal after {timeout_s}s: {pending}")
            time.sleep(0.5)

    def finished_by_status(self) -> dict[str, float]:
        reg = CollectorRegistry()
        MultiProcessCollector(reg, path=str(self.metrics_dir))
        out: dict[str, float] = {}
        for metric in reg.collect():
            if metric.name == "actfleet_tasks_finished":
                for s in metric.samples:
                    if s.name.endswith("_total"):
                        out[s.labels["status"]] = out.get(s.labels["status"], 0) + s.value
        return out

    def close(self) -> None:
        for proc in [*self.workers, self.fake_llm]:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)


@pytest.fixture
def fleet(redis_server: RedisServer, tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(redis_server, tmp_path)
    yield f
    f.close()


def assert_each_ran_exactly_once(fleet: Fleet, ids: list[str]) -> None:
    for task_id in ids:
        rec = fleet.store.get(task_id)
        assert rec is not None and rec.result is not None
        assert (rec.status, rec.result.answer, rec.result.correct) == (
            Status.COMPLETED,
            "3",
            True,
        ), (task_id, rec.result)
        events = fleet.store.events(task_id)
        steps = Counter((e.turn, e.type) for e in events if e.type in STEP_TYPES)
        assert all(n == 1 for n in steps.values()), (task_id, steps)
        assert len(steps) == 7  # 4 replies, 3 executions: no turn lost, none twice
        assert [e.type for e in events].count(EventType.FINISHED) == 1
        assert events[-1].type is EventType.FINISHED


def test_sigkill_of_a_worker_mid_batch_loses_and_repeats_nothing(fleet: Fleet) -> None:
    # given two workers and a batch under way
    victim = fleet.start_worker()
    fleet.start_worker()
    ids = fleet.submit(24)

    # when the first worker is SIGKILLed while it is in the middle of some tasks
    deadline = time.monotonic() + 60
    while True:
        held = fleet.leases_of(victim.pid)
        seqs = [int(fleet.store.r.hget(f"af:task:{t}", "seq") or 0) for t in held]
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
    fleet.store.r.hset(f"af:task:{task_id}", "cancel_requested", "1")
    asked = time.monotonic()

    # then it ends as cancelled a few seconds later, with the sandbox stopped
    statuses = fleet.wait_all_terminal([task_id], timeout_s=20)
    assert statuses[task_id] is Status.CANCELLED
    assert time.monotonic() - asked < 10
