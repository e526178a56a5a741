"""The whole stack, for real: a redis-server, the API and a worker as separate processes
(``actfleet.stack.LocalStack``, what ``actfleet up`` runs), bwrap sandboxes, and the
scripted fake model server over HTTP. Everything a client sees goes through the HTTP API.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from actfleet.client import ApiError, Client
from actfleet.fakellm import FakeLLMServer, load_script
from actfleet.stack import LocalStack
from store.apikeys import create_key, issue_key
from store.batches import sum_counters
from store.keys import Keys
from tests.receivers import Receiver

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.bwrap,
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="needs bubblewrap"),
]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

SCRIPT: list[dict[str, Any]] = [
    # Cancel target: code that would run for two minutes.
    {
        "when": {"prompt_regex": "sleepy"},
        "reply": "<execute>\nimport time\ntime.sleep(120)\n</execute>",
    },
    # Multi-turn: a variable from turn 1 is used in turn 2; then answer what was printed.
    {
        "when": {"prompt_regex": "remember", "turn": 1},
        "reply": "<execute>\nsecret = 20 + 1\nprint('stored')\n</execute>",
    },
    {
        "when": {"prompt_regex": "remember", "turn": 2},
        "reply": "<execute>\nprint(secret * 2)\n</execute>",
    },
    # Recovery: a NameError first, then a fix that reads the traceback's lesson.
    {
        "when": {"prompt_regex": "recover", "turn": 1},
        "reply": "<execute>\nprint(undefined_thing)\n</execute>",
    },
    {
        "when": {"prompt_regex": "recover", "last_regex": "NameError"},
        "reply": "<execute>\nundefined_thing = 5\nprint(undefined_thing)\n</execute>",
    },
    # Tools defined by setup_code.
    {
        "when": {"prompt_regex": r"tool: (?P<call>\w+\(\d+\))", "turn": 1},
        "reply": "<execute>\nprint({call})\n</execute>",
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


class Stack:
    def __init__(self, stack: LocalStack, llm: FakeLLMServer) -> None:
        self.stack = stack
        self.llm = llm
        assert stack.redis_url is not None
        self.redis = redis.Redis.from_url(stack.redis_url)
        self.keys = Keys("af")

    def client(self, tenant: str = "acme") -> Client:
        key, _ = create_key(self.redis, self.keys, tenant)
        return Client(self.stack.api_url, key)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with FakeLLMServer(script=SCRIPT, latency_s=0.05) as llm:
        env = {
            "OPENAI_BASE_URL": llm.url,
            "OPENAI_API_KEY": "test",
            "ACTFLEET_SANDBOX": "bwrap",
            "ACTFLEET_MODEL": "fake",
            "ACTFLEET_WEBHOOK_ALLOWLIST": "127.0.0.1/32",
            "ACTFLEET_WEBHOOK_POLL_S": "0.2",
        }
        local = LocalStack(concurrency=8, env=env, state_dir=tmp_path_factory.mktemp("stack"))
        with local:
            yield Stack(local, llm)


def spec(prompt: str, **kw: Any) -> dict[str, Any]:
    return {"prompt": prompt, "limits": {"max_turns": 5, "exec_timeout_s": 30}, **kw}


FIB = (
    "def fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n"
)


def test_a_batch_completes_with_correct_answers_and_results_come_back_by_custom_id(
    stack: Stack,
) -> None:
    # Given a batch that needs state across turns, recovery from a traceback and a tool
    tasks = [
        spec("remember a number", custom_id="mem", expected={"answer": 42, "grader": "numeric"}),
        spec("recover please", custom_id="rec", expected={"answer": "5"}),
        spec(
            "use the tool: fib(20)",
            custom_id="tool",
            setup_code=FIB,
            tools=[{"name": "fib", "signature": "fib(n: int) -> int"}],
            expected={"answer": 6765, "grader": "python_literal"},
        ),
        spec("Compute: 6*7", custom_id="calc", expected={"answer": "42"}),
        spec("Compute: 6*7", custom_id="wrong", expected={"answer": "43"}),
    ]
    with stack.client() as c:
        # When it is submitted as JSONL and waited for
        accepted = c.submit_batch("\n".join(json.dumps(t) for t in tasks))
        status = c.wait_batch(accepted["id"], poll_s=0.2, timeout_s=120)
        results = {r["custom_id"]: r for r in c.batch_results(accepted["id"], trajectory=True)}

    # Then every task completed, graded as expected, and the batch summary adds up
    assert status["total"] == 5 and status["finished"] == 5
    assert status["counts"]["completed"] == 5
    assert {k: r["correct"] for k, r in results.items()} == {
        "mem": True,
        "rec": True,
        "tool": True,
        "calc": True,
        "wrong": False,
    }
    assert list(results) == ["mem", "rec", "tool", "calc", "wrong"]  # input order
    assert results["mem"]["turns"] == 3
    assert "NameError" in json.dumps(results["rec"]["messages"])
    assert results["wrong"]["failure_class"] == "wrong_answer"
    assert status["success_rate"] == pytest.approx(4 / 5)


def test_sse_delivers_every_event_once_in_order_and_resumes_from_last_event_id(
    stack: Stack,
) -> None:
    with stack.client() as c:
        task_id = c.submit(spec("remember this"))["id"]
        # A live tail from the start, until the stream closes after task.finished
        live = list(c.events(task_id))
        # A reconnect after the third event replays exactly the rest
        resumed = list(c.events(task_id, last_event_id=live[2].id))

    kinds = [e.type for e in live]
    assert kinds[0] == "task.queued" and kinds[1] == "task.started"
    assert kinds[-1] == "task.finished" and kinds.count("task.finished") == 1
    assert kinds[2:-1] == ["llm.reply", "exec.result"] * 2 + ["llm.reply"]
    ids = [e.id for e in live]
    assert len(set(ids)) == len(ids)
    assert [tuple(map(int, i.split("-"))) for i in ids] == sorted(
        tuple(map(int, i.split("-"))) for i in ids
    )
    turns = [e.event["turn"] for e in live[2:-1]]
    assert turns == [1, 1, 2, 2, 3]
    assert [e.id for e in resumed] == ids[3:]


def test_cancel_stops_a_running_execution_within_seconds(stack: Stack) -> None:
    with stack.client() as c:
        task_id = c.submit(spec("sleepy task"))["id"]
        # Wait until its code is running in the sandbox
        for event in c.events(task_id):
            if event.type == "llm.reply":
                break
        time.sleep(0.5)
        asked = time.monotonic()
        c.cancel(task_id)
        while c.task(task_id)["status"] not in ("cancelled", "completed", "failed", "error"):
            assert time.monotonic() - asked < 10, "cancel took longer than 10 s"
            time.sleep(0.1)
        record = c.task(task_id)
    assert record["status"] == "cancelled"
    assert record["result"]["failure_class"] == "cancelled"


def test_tenants_never_see_each_others_tasks(stack: Stack) -> None:
    with stack.client("alpha") as a, stack.client("beta") as b:
        task_id = a.submit(spec("Compute: 1+1"))["id"]
        with pytest.raises(ApiError) as info:
            b.task(task_id)
        assert info.value.status == 404
        with pytest.raises(ApiError) as info:
            b.cancel(task_id)
        assert info.value.status == 404
        assert all(t["id"] != task_id for t in b.tasks()["tasks"])


def test_bad_input_gets_a_4xx_that_says_what_to_fix(stack: Stack) -> None:
    with stack.client() as c:
        resp = c.http.post("/v1/tasks", json={"prompt": "x", "limits": {"max_turns": 0}})
        assert resp.status_code == 422
        assert "limits.max_turns: must be between 1 and 200, got 0" in resp.text
        resp = c.http.post("/v1/batches", content='{"prompt": "ok"}\n{"promt": "typo"}\n')
        assert resp.status_code == 422
        assert "line" in resp.text and "promt" in resp.text
        assert c.http.post("/v1/tasks", content="{not json").status_code == 400
    assert httpx.get(f"{stack.stack.api_url}/v1/tasks").status_code == 401


def test_the_example_batch_is_answered_correctly_by_its_fake_llm_script() -> None:
    # The README's main job (examples/ + the scripted model), on a stack of its own: the
    # workers read the model server's URL when they start.
    script, batch = EXAMPLES / "fake_llm_script.json", EXAMPLES / "batch.jsonl"
    lines = [json.loads(line) for line in batch.read_text().splitlines() if line.strip()]
    with FakeLLMServer(script=load_script(script)) as llm:
        env = {"OPENAI_BASE_URL": llm.url, "OPENAI_API_KEY": "test", "ACTFLEET_SANDBOX": "bwrap"}
        with LocalStack(concurrency=8, env=env) as local:
            r = redis.Redis.from_url(local.redis_url or "")
            key, _ = create_key(r, Keys("af"), "examples")
            with Client(local.api_url, key) as c:
                accepted = c.submit_batch("\n".join(json.dumps(t) for t in lines))
                status = c.wait_batch(accepted["id"], poll_s=0.2, timeout_s=180)
                results = list(c.batch_results(accepted["id"]))
    assert status["finished"] == len(lines)
    wrong = [
        (r["custom_id"], r["status"], r["answer"]) for r in results if r["correct"] is not True
    ]
    assert wrong == []


def test_metrics_count_finished_tasks_by_status(stack: Stack) -> None:
    with stack.client() as c:
        ids = [c.submit(spec("Compute: 2+2"))["id"] for _ in range(3)]
        for task_id in ids:
            list(c.events(task_id))
    counts = sum_counters(
        stack.redis.hgetall(stack.keys.finished_counts(s)) for s in stack.keys.shard_ids
    )
    assert counts.get("completed", 0) >= 3
    page = httpx.get(f"{stack.stack.api_url}/metrics").text
    for status, n in counts.items():
        # what the workers counted, and what the fleet-wide record says, agree
        assert f'actfleet_tasks_finished_total{{status="{status}"}} {float(n)}' in page
        assert f'actfleet_fleet_tasks_finished_total{{status="{status}"}} {float(n)}' in page


def test_a_finished_task_calls_its_webhook_signed_per_standard_webhooks(stack: Stack) -> None:
    # Given a tenant (its first key made its signing secret) and a receiver on loopback
    issued = issue_key(stack.redis, stack.keys, "hooked")
    assert issued.webhook_secret is not None
    receiver = Receiver()
    try:
        # When a task with a webhook finishes
        with Client(stack.stack.api_url, issued.key) as c:
            task_id = c.submit(spec("Compute: 3*3", webhook={"url": receiver.url()}))["id"]
            list(c.events(task_id))
            receiver.wait_for(1, timeout_s=15)
            record = c.task_webhook(task_id)
    finally:
        receiver.close()
    # Then the receiver got one POST that an independent implementation verifies
    [got] = receiver.received
    payload = got.verify(issued.webhook_secret)
    assert payload["type"] == "task.finished"
    assert payload["data"]["task_id"] == task_id and payload["data"]["status"] == "completed"
    assert record["state"] == "delivered" and record["attempts"][0]["status_code"] == 204
    assert sum(stack.redis.zcard(stack.keys.webhook_outbox(s)) for s in stack.keys.shard_ids) == 0
