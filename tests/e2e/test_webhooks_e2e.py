"""Webhooks through the whole stack, for real: a redis-server with AOF, the API and worker
processes (``actfleet.stack.LocalStack``), bwrap sandboxes, the scripted model server, and
a receiver on loopback (allowlisted) whose every request is verified with the independent
``standardwebhooks`` implementation. Workers are SIGKILLed and Redis is SIGKILLed and
restarted; the delivery schedule lives in Redis, so it carries on.
"""

from __future__ import annotations

import json
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from actfleet.client import ApiError, Client
from actfleet.fakellm import FakeLLMServer
from actfleet.stack import LocalStack
from store.apikeys import issue_key
from store.keys import Keys
from tests.conftest import RedisServer
from tests.receivers import Receiver

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.bwrap,
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="needs bubblewrap"),
]

SCRIPT: list[dict[str, Any]] = [
    {
        "when": {"prompt_regex": "sleepy"},
        "reply": "<execute>\nimport time\ntime.sleep(120)\n</execute>",
    },
    {
        "when": {"last_regex": r"^Observation:\n(?P<out>\S+)\s*$"},
        "reply": "<solution>{out}</solution>",
    },
    {
        "when": {"prompt_regex": r"Compute: (?P<expr>.+)$", "turn": 1},
        "reply": "<execute>\nprint({expr})\n</execute>",
    },
]
ENV = {
    "OPENAI_API_KEY": "test",
    "ACTFLEET_SANDBOX": "bwrap",
    "ACTFLEET_MODEL": "fake",
    "ACTFLEET_WEBHOOK_ALLOWLIST": "127.0.0.1/32",
    "ACTFLEET_WEBHOOK_POLL_S": "0.2",
    "ACTFLEET_WEBHOOK_BACKOFF_BASE_S": "1",
    "ACTFLEET_WEBHOOK_BACKOFF_MAX_S": "2",
    "ACTFLEET_POOL_MIN": "0",
}


class Hooks:
    def __init__(self, stack: LocalStack, server: RedisServer) -> None:
        self.stack = stack
        self.server = server
        assert stack.redis_url is not None
        self.redis = redis.Redis.from_url(stack.redis_url)
        self.keys = Keys("af")
        issued = issue_key(self.redis, self.keys, "hooked")
        assert issued.webhook_secret is not None
        self.secret = issued.webhook_secret
        self.client = Client(stack.api_url, issued.key)

    def leases_of(self, pid: int) -> list[str]:
        out = []
        for key in self.redis.scan_iter("af:{*}:lease:*"):
            owner = self.redis.get(key)
            if owner is not None and f"-{pid}-" in owner.decode():
                out.append(key.decode().rsplit(":", 1)[1])
        return out

    def patiently(self, call: Any, timeout_s: float = 30) -> Any:
        """An API call, retried while the API answers 503 (Redis just restarted)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return call()
            except (ApiError, redis.ConnectionError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)


@pytest.fixture
def hooks(tmp_path: Path, redis_server: RedisServer) -> Iterator[Hooks]:
    with FakeLLMServer(script=SCRIPT, latency_s=0.05) as llm:
        local = LocalStack(
            redis_url=redis_server.url,
            concurrency=4,
            env={**ENV, "OPENAI_BASE_URL": llm.url},
            state_dir=tmp_path / "stack",
        )
        with local:
            h = Hooks(local, redis_server)
            yield h
            h.client.close()


def spec(prompt: str, **kw: Any) -> dict[str, Any]:
    return {"prompt": prompt, "limits": {"max_turns": 4, "exec_timeout_s": 60}, **kw}


def test_retries_after_500_survive_a_worker_kill_and_a_redis_restart(hooks: Hooks) -> None:
    failing = [True]
    statuses: list[int] = []

    def answer() -> tuple[int, dict[str, str]]:
        code = 500 if failing[0] else 204
        statuses.append(code)
        return code, {}

    receiver = Receiver(answers=[answer] * 1000)
    stack = hooks.stack
    try:
        # Given a task with a webhook whose receiver answers 500
        task_id = hooks.client.submit(spec("Compute: 20+22", webhook={"url": receiver.url()}))["id"]
        receiver.wait_for(1, timeout_s=60)

        # When the only worker is SIGKILLed, nothing is sent while no worker runs
        [worker] = stack.worker_procs
        worker.send_signal(signal.SIGKILL)
        worker.wait()
        seen = len(receiver.received)
        time.sleep(4)
        assert len(receiver.received) == seen
        # and a new worker carries on with the schedule it finds in Redis
        stack.start_worker()
        receiver.wait_for(seen + 1, timeout_s=60)

        # When Redis is SIGKILLed (the schedule was fsynced) and restarted on its AOF
        time.sleep(2)
        hooks.server.kill()
        time.sleep(2)
        hooks.server.start()
        seen = len(receiver.received)
        receiver.wait_for(seen + 1, timeout_s=60)  # retries go on

        # and the receiver recovers: the next retry is delivered
        failing[0] = False
        receiver.wait_for(1, timeout_s=30, what=lambda: statuses.count(204))
        time.sleep(3)  # and nothing comes after it
    finally:
        receiver.close()

    assert statuses.count(204) == 1 and statuses[-1] == 204
    assert len(receiver.received) >= 4
    assert {r.headers["webhook-id"] for r in receiver.received} == {f"msg_{task_id}"}
    for r in receiver.received:
        payload = r.verify(hooks.secret)
        assert payload["data"]["task_id"] == task_id and payload["data"]["status"] == "completed"
    record = hooks.patiently(lambda: hooks.client.task_webhook(task_id))
    assert record["state"] == "delivered"
    outcomes = [a["outcome"] for a in record["attempts"]]
    assert outcomes[-1] == "delivered" and set(outcomes[:-1]) <= {"retrying", "lost"}
    assert sum(hooks.redis.zcard(hooks.keys.webhook_outbox(s)) for s in hooks.keys.shard_ids) == 0
    # and the workers (the killed one's samples included) counted each outcome
    page = hooks.patiently(lambda: httpx.get(f"{stack.api_url}/metrics", timeout=10).text)
    counted = {
        outcome: float(line.rsplit(" ", 1)[1])
        for line in page.splitlines()
        for outcome in ("delivered", "retrying")
        if line.startswith(f'actfleet_webhook_deliveries_total{{outcome="{outcome}"}}')
    }
    assert counted["delivered"] == 1.0
    assert counted["retrying"] >= 3


def test_batch_finished_arrives_once_after_a_cancel_mid_batch_and_a_killed_worker(
    hooks: Hooks,
) -> None:
    stack = hooks.stack
    stack.start_worker()  # two workers
    receiver = Receiver()
    try:
        # Given a batch with a webhook, half of its tasks running for minutes
        tasks = [spec("Compute: 6*7", custom_id=f"quick{i}") for i in range(3)] + [
            spec("sleepy", custom_id=f"sleepy{i}") for i in range(3)
        ]
        body = "\n".join(json.dumps(t) for t in tasks)
        batch = hooks.client.submit_batch(body, webhook_url=receiver.url("/batch"))
        batch_id = batch["id"]
        # When a worker running some of them is SIGKILLed and the batch is cancelled
        deadline = time.monotonic() + 60
        victim = None
        while victim is None:
            assert time.monotonic() < deadline, "no worker took a sleepy task"
            for proc in stack.worker_procs:
                held = hooks.leases_of(proc.pid)
                sleepy = [
                    t
                    for t in held
                    if b"sleepy" in (hooks.redis.hget(hooks.keys.task(t), "custom_id") or b"")
                ]
                if sleepy:
                    victim = proc
            time.sleep(0.2)
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        hooks.client.cancel_batch(batch_id)
        status = hooks.client.wait_batch(batch_id, poll_s=0.5, timeout_s=150)
        receiver.wait_for(1, timeout_s=30)
        time.sleep(4)  # time for a duplicate to show up, if there were one
    finally:
        receiver.close()

    # Then batch.finished came exactly once, signed, with counts that add up
    [got] = [r for r in receiver.received if r.path == "/batch"]
    payload = got.verify(hooks.secret)
    assert payload["type"] == "batch.finished"
    data = payload["data"]
    assert data["batch_id"] == batch_id and data["status"] == "cancelled"
    assert data["total"] == 6 and sum(data["counts"].values()) == 6
    assert data["counts"] == {k: v for k, v in status["counts"].items() if v}
    assert data["counts"].get("cancelled", 0) >= 3
    record = hooks.client.batch_webhook(batch_id)
    assert record["state"] == "delivered" and len(record["attempts"]) == 1
