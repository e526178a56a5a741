"""Hostile tasks through the whole stack (redis-server, the API and a worker as separate
processes, bwrap sandboxes, the scripted fake model server): answers that would stall a
grader, and a stored record from before lone surrogates were refused."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from actfleet.client import Client
from actfleet.fakellm import FakeLLMServer
from actfleet.stack import LocalStack
from agent.models import TaskSpec
from store.apikeys import create_key
from store.celery_app import run_task_pushes
from store.keys import Keys
from store.records import TaskRecord

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.bwrap,
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="needs bubblewrap"),
]

SCRIPT: list[dict[str, Any]] = [
    {"when": {"prompt_regex": "backtrack"}, "reply": "<solution>" + "a" * 32 + "!</solution>"},
    {"when": {"prompt_regex": "digits"}, "reply": "<solution>" + "1" * 99_000 + "x</solution>"},
    {"reply": "<solution>42</solution>"},
]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalStack, redis.Redis]]:
    with FakeLLMServer(script=SCRIPT, latency_s=0.05) as llm:
        env = {
            "OPENAI_BASE_URL": llm.url,
            "OPENAI_API_KEY": "test",
            "ACTFLEET_SANDBOX": "bwrap",
            "ACTFLEET_MODEL": "fake",
        }
        local = LocalStack(concurrency=4, env=env, state_dir=tmp_path_factory.mktemp("stack"))
        with local:
            assert local.redis_url is not None
            client = redis.Redis.from_url(local.redis_url)
            yield local, client
            client.close()


def client_for(stack: tuple[LocalStack, redis.Redis], tenant: str) -> Client:
    local, r = stack
    key, _ = create_key(r, Keys("af"), tenant)
    return Client(local.api_url, key)


def wait_finished(client: Client, task_id: str, timeout_s: float = 90) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        task = client.task(task_id)
        if task["status"] not in ("queued", "running"):
            return task
        time.sleep(0.2)
    raise AssertionError(f"{task_id} did not finish within {timeout_s}s: {task}")


def test_answers_that_would_stall_a_grader_are_graded_and_others_keep_running(
    stack: tuple[LocalStack, redis.Redis],
) -> None:
    # Given a tenant's tasks whose answers take a backtracking regex, or a number pattern
    # that splits digits two ways, minutes; and another tenant's plain task
    hostile = client_for(stack, "hostile")
    other = client_for(stack, "other")
    regex = hostile.submit(
        {"prompt": "backtrack", "expected": {"answer": "^(a+)+$", "grader": "regex"}}
    )["id"]
    digits = hostile.submit({"prompt": "digits", "expected": {"answer": 7, "grader": "numeric"}})
    plain = other.submit({"prompt": "plain", "expected": {"answer": 42, "grader": "numeric"}})
    # Then each is graded (wrong) and the other tenant's task completes, all well within
    # the wait (minutes of grading each before)
    for task_id, client in ((regex, hostile), (digits["id"], hostile)):
        task = wait_finished(client, task_id)
        assert task["status"] == "completed", task
        assert task["result"]["correct"] is False
        assert task["result"]["failure_class"] == "wrong_answer"
    assert wait_finished(other, plain["id"])["result"]["correct"] is True


def test_a_stored_task_from_before_surrogates_were_refused_runs_and_reads_back(
    stack: tuple[LocalStack, redis.Redis],
) -> None:
    # Given a queued task stored before lone surrogates were refused (prompt and metadata)
    _, r = stack
    client = client_for(stack, "legacy")
    keys = Keys("af")
    record = TaskRecord(
        id="task_legacy0000000000000001",
        tenant="legacy",
        spec=TaskSpec(prompt="answer \udfff please", metadata={"k": "v\udfff"}),
    )
    r.hset(keys.task(record.id), mapping=record.to_hash())  # type: ignore[arg-type]
    r.zadd(keys.tenant_tasks("legacy"), {record.id: record.created_at})
    for queue, messages in run_task_pushes([record.id], int(time.time() * 1000)):
        r.lpush(queue, *messages)
    # When a worker takes it
    task = wait_finished(client, record.id)
    # Then it ran to its answer (no worker crash, no worker_lost), and reads back cleaned
    assert task["status"] == "completed", task
    assert task["result"]["answer"] == "42"
    assert task["metadata"] == {"k": "v\ufffd"}
    assert any(t["id"] == record.id for t in client.tasks()["tasks"])
