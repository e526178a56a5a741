"""Real processes for the chaos tests: worker subprocesses (``actfleet worker``), optionally
the API (``actfleet api``), the scripted fake model server, and a store client, around one
redis-server with AOF.

Each task of the default script takes four turns (three cells that build up ``acc``, then
the answer), so a task that is resumed on another worker only answers ``3`` if its sandbox
state was rebuilt from the checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

from agent.events import EventType
from agent.models import Status, TaskSpec
from store import keys as keynames
from store.apikeys import create_key
from store.celery_app import enqueue, make_celery
from store.keys import Keys
from store.worker_store import WorkerStore
from tests.conftest import RedisServer, free_port
from tests.records import create, new_record

TURN_LATENCY_S = 0.6
SCRIPT: list[dict[str, Any]] = [
    {"when": {"prompt_regex": "flaky", "turn": 2}, "status": 503, "error": "down", "times": 1},
    {
        "when": {"prompt_regex": "sleepy"},
        "reply": "<execute>\nimport time\ntime.sleep(120)\n</execute>",
    },
    {
        "when": {"prompt_regex": "slow", "turn": 2},
        "reply": "<execute>\nimport time\ntime.sleep(8)\nacc += 1\nprint('acc', acc)\n</execute>",
    },
    {"when": {"turn": 1}, "reply": "<execute>\nacc = 1\nprint('acc', acc)\n</execute>"},
    {"when": {"turn": 2}, "reply": "<execute>\nacc += 1\nprint('acc', acc)\n</execute>"},
    {"when": {"turn": 3}, "reply": "<execute>\nacc += 1\nprint('acc', acc)\n</execute>"},
    {"when": {"turn": 4, "last_regex": "acc (?P<out>\\d+)"}, "reply": "<solution>{out}</solution>"},
]
STEP_TYPES = (EventType.LLM_REPLY, EventType.EXEC_RESULT)
_KOMBU_QOS_WORKER = """
import sys
from kombu.transport import redis as kombu_redis
from store import broker
broker.Channel.QoS = kombu_redis.QoS
from actfleet.cli import main
sys.exit(main(sys.argv[1:]))
"""


class Fleet:
    """Workers, the fake model server and a store client around one redis-server."""

    def __init__(self, server: RedisServer, tmp: Path, **env: str) -> None:
        self.server = server
        self.tmp = tmp
        self.metrics_dir = tmp / "metrics"
        self.metrics_dir.mkdir()
        self.store = WorkerStore(redis.Redis.from_url(server.url), Keys("af"))
        self.celery = make_celery(server.url)
        self.workers: list[subprocess.Popen[bytes]] = []
        self.health_ports: dict[int, int] = {}  # worker pid -> its metrics/health port
        self.api: subprocess.Popen[bytes] | None = None
        self.api_url = ""
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
            **env,
        )

    # -- processes ---------------------------------------------------------------------

    def start_worker(
        self, concurrency: int = 6, *, kombu_qos: bool = False, **env: str
    ) -> subprocess.Popen[bytes]:
        """``actfleet worker`` with its health server on a free port. ``kombu_qos``: with
        kombu's own acknowledgement bookkeeping instead of ``store.broker``'s, whose
        consumer dies when its tasks end during a Redis outage: a real dead consumer, for
        the checks of what a worker does about one."""
        n = len(self.workers)
        port = free_port()
        log = (self.tmp / f"worker-{n}.log").open("wb")
        args = ["worker", "--concurrency", str(concurrency), "--metrics-port", str(port)]
        if kombu_qos:
            launcher = [sys.executable, "-c", _KOMBU_QOS_WORKER, *args]
        else:
            launcher = [sys.executable, "-m", "actfleet", *args]
        proc = subprocess.Popen(
            launcher,
            env={**self.env, **env},
            stdout=log,
            stderr=log,
        )
        self.workers.append(proc)
        self.health_ports[proc.pid] = port
        return proc

    def start_api(self) -> str:
        port = free_port()
        log = (self.tmp / "api.log").open("wb")
        self.api = subprocess.Popen(
            [sys.executable, "-m", "actfleet", "api", "--port", str(port)],
            env=self.env,
            stdout=log,
            stderr=log,
        )
        self.api_url = f"http://127.0.0.1:{port}"
        wait_for(lambda: httpx.get(f"{self.api_url}/healthz", timeout=1).status_code == 200, 30)
        return self.api_url

    def api_client(self, tenant: str = "acme") -> httpx.Client:
        key, _ = create_key(self.store.r, Keys("af"), tenant)
        return httpx.Client(
            base_url=self.api_url, headers={"Authorization": f"Bearer {key}"}, timeout=30
        )

    def api_client_nokey(self) -> httpx.Client:
        """A client that needs no Redis to be built (for probes while Redis is down)."""
        return httpx.Client(base_url=self.api_url, timeout=30)

    def health(self, proc: subprocess.Popen[bytes], path: str = "/healthz") -> httpx.Response:
        port = self.health_ports[proc.pid]
        return httpx.get(f"http://127.0.0.1:{port}{path}", timeout=5)

    def wait_healthy(self, proc: subprocess.Popen[bytes], timeout_s: float = 60) -> None:
        wait_for(lambda: self.health(proc).status_code == 200, timeout_s)

    def sigterm(self, proc: subprocess.Popen[bytes], timeout_s: float = 120) -> int:
        proc.send_signal(signal.SIGTERM)
        return proc.wait(timeout=timeout_s)

    # -- tasks -------------------------------------------------------------------------

    def submit(self, n: int, prompt: str = "count") -> list[str]:
        ids = []
        for i in range(n):
            rec = new_record(
                TaskSpec.from_dict({"prompt": f"{prompt} #{i}", "expected": {"answer": "3"}})
            )
            create(self.store, rec)
            enqueue(self.celery, rec.id, int(rec.created_at * 1000))
            ids.append(rec.id)
        return ids

    def queue_depth(self) -> int:
        return int(self.store.r.llen(keynames.TASK_QUEUE))

    def leases_of(self, pid: int) -> list[str]:
        """Task ids whose lease a worker process holds now."""
        out = []
        for key in self.store.r.scan_iter("af:{*}:lease:*"):
            owner = self.store.r.get(key)
            if owner is not None and f"-{pid}-" in owner.decode():
                out.append(key.decode().rsplit(":", 1)[1])
        return out

    def wait_mid_task(self, pid: int, n: int = 2, timeout_s: float = 60) -> list[str]:
        """Wait until worker ``pid`` is past the first steps of ``n`` tasks; their ids."""
        deadline = time.monotonic() + timeout_s
        while True:
            held = self.leases_of(pid)
            seqs = {t: int(self.store.r.hget(self.store.keys.task(t), "seq") or 0) for t in held}
            if sum(1 for s in seqs.values() if s >= 3) >= n:
                return held
            assert time.monotonic() < deadline, f"worker {pid} never got mid-task: {seqs}"
            time.sleep(0.1)

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

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.tmp.glob("*.log")))

    def close(self) -> None:
        for proc in [*self.workers, *([self.api] if self.api else []), self.fake_llm]:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)


def wait_for(check: Any, timeout_s: float, interval_s: float = 0.2) -> None:
    deadline = time.monotonic() + timeout_s
    last: object = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception as e:  # not up yet
            last = e
        time.sleep(interval_s)
    pytest.fail(f"not true after {timeout_s}s (last error: {last!r})")


def assert_each_ran_exactly_once(fleet: Fleet, ids: list[str]) -> None:
    """Every task completed correctly, with one task.finished and no step twice or lost."""
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
        # every entry the workers appended (all but task.queued and task.finished) took
        # its own sequence number: none twice, none outside the fenced appends
        seq = int(fleet.store.r.hget(fleet.store.keys.task(task_id), "seq") or 0)
        appended = [e for e in events if e.type not in (EventType.QUEUED, EventType.FINISHED)]
        assert len(appended) == seq, (task_id, seq, [e.type for e in events])
