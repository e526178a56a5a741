"""Hostile input over real HTTP: every request that cannot be a task gets a 4xx saying what
to fix, nothing of it is queued, and one bad stored record never breaks a tenant's reads."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from agent.models import Result, Status, TaskSpec
from store.keys import TASK_QUEUE
from store.records import TaskRecord
from tests.api.conftest import Fleet, spec

B64 = base64.b64encode(b"data").decode()


def post_both(fleet: Fleet, body: bytes) -> tuple[Any, Any, Any]:
    """The body as one task, as a one-line JSONL batch and as a one-item JSON array."""
    with fleet.client() as c:
        one = c.post("/v1/tasks", content=body)
        lines = c.post(
            "/v1/batches", content=body + b"\n", headers={"Content-Type": "application/x-ndjson"}
        )
        array = c.post("/v1/batches", content=b"[" + body + b"]")
    return one, lines, array


def test_a_hundred_thousand_nested_brackets_get_400_not_500(fleet: Fleet) -> None:
    body = b"[" * 100_000
    with fleet.client() as c:
        one = c.post("/v1/tasks", content=body)
        lines = c.post("/v1/batches", content=b'{"prompt": "fine"}\n' + body + b"\n")
        array = c.post("/v1/batches", content=b"[" + body)
    assert one.status_code == 400 and "nested too deeply" in one.json()["detail"]["message"]
    assert lines.status_code == 400
    [error] = lines.json()["detail"]["errors"]
    assert error["line"] == 2 and "nested too deeply" in error["problems"][0]
    assert array.status_code == 400 and "nested too deeply" in array.json()["detail"]["message"]
    assert fleet.redis.llen(TASK_QUEUE) == 0


def test_a_batch_line_nested_just_past_pythons_recursion_limit_gets_an_answer(
    fleet: Fleet,
) -> None:
    """Deep enough for Python's stack (1000 frames), shallow enough for orjson (1024): the
    quick reader must hand it to the strict one, not raise."""
    deep = b"[" * 1000 + b"]" * 1000
    line = b'{"prompt": "fine", "metadata": {"k": ' + deep + b"}}"
    with fleet.client() as c:
        resp = c.post("/v1/batches", content=b'{"prompt": "fine"}\n' + line + b"\n")
    assert resp.status_code == 400, resp.text
    [error] = resp.json()["detail"]["errors"]
    assert error["line"] == 2 and "nested too deeply" in error["problems"][0]
    assert fleet.redis.llen(TASK_QUEUE) == 0


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b'{"prompt": "x", "limits": {"timeout_s": NaN}}', "NaN is not a JSON number"),
        (b'{"prompt": "x", "limits": {"timeout_s": Infinity}}', "Infinity is not a JSON number"),
        (b'{"prompt": "x", "limits": {"timeout_s": -Infinity}}', "-Infinity is not a JSON number"),
        (b'{"prompt": "x", "expected": {"answer": 1e400}}', "beyond the range of a 64-bit float"),
        (
            b'{"prompt": "x", "expected": {"answer": ' + b"9" * 5000 + b"}}",
            "an integer has 5000 digits; the limit is 4300",
        ),
        (b'{"prompt": "x", "prompt": "y"}', "the key 'prompt' appears twice in one object"),
    ],
)
def test_json_the_api_does_not_take_gets_400_saying_why(
    fleet: Fleet, body: bytes, why: str
) -> None:
    one, lines, array = post_both(fleet, body)
    assert one.status_code == 400 and why in one.json()["detail"]["message"]
    assert lines.status_code == 400 and why in lines.json()["detail"]["errors"][0]["problems"][0]
    assert array.status_code == 400 and why in array.json()["detail"]["message"]
    assert fleet.redis.llen(TASK_QUEUE) == 0


@pytest.mark.parametrize(
    ("raw", "where"),
    [
        ('{"prompt": "x", "metadata": {"k": "\\udfff"}}', "metadata.k"),
        ('{"prompt": "\\ud800 and more"}', "prompt"),
        ('{"prompt": "x", "metadata": {"\\udc00": "v"}}', "metadata.\\udc00"),
        ('{"prompt": "x", "expected": {"answer": {"a": ["\\udfff"]}}}', "expected.answer.a[0]"),
        ('{"prompt": "x", "tools": [{"name": "f", "signature": "\\udfff"}]}', "tools[0].signature"),
    ],
)
def test_a_lone_surrogate_anywhere_is_refused_with_422_naming_the_field(
    fleet: Fleet, raw: str, where: str
) -> None:
    one, lines, array = post_both(fleet, raw.encode())
    for r in (one, lines, array):
        assert r.status_code == 422, r.text
    assert any(
        p.startswith(f"{where}: is not valid Unicode text")
        for p in one.json()["detail"]["problems"]
    )
    assert lines.json()["detail"]["errors"][0]["problems"] == one.json()["detail"]["problems"]
    assert fleet.redis.llen(TASK_QUEUE) == 0


@pytest.mark.parametrize(
    ("patch", "where", "fix"),
    [
        ({"files": [{"path": "a\x00b", "content_b64": B64}]}, "files[0].path", "relative path"),
        ({"files": [{"path": ".", "content_b64": B64}]}, "files[0].path", "relative path"),
        ({"files": [{"path": "a/.", "content_b64": B64}]}, "files[0].path", "relative path"),
        ({"files": [{"path": "/etc/x", "content_b64": B64}]}, "files[0].path", "relative path"),
        ({"files": [{"path": "a\tb", "content_b64": B64}]}, "files[0].path", "relative path"),
        ({"files": [{"path": "x", "content_b64": "eA=\n"}]}, "files[0].content_b64", "base64"),
        ({"custom_id": "row-1\n"}, "custom_id", "use 1-128 characters"),
        ({"limits": {"max_turns": 10**30}}, "limits.max_turns", "between 1 and 200"),
        ({"llm": {"seed": -1}}, "llm.seed", "between 0 and"),
        ({"tools": [{"name": "not an identifier"}]}, "tools[0].name", "Python identifier"),
        ({"expected": {"answer": "(?=x)", "grader": "regex"}}, "expected.answer", "RE2"),
        ({"expected": {"answer": "(a)\\1", "grader": "regex"}}, "expected.answer", "RE2"),
        ({"sandbox": {"memory_mb": 65536}}, "sandbox.memory_mb", "ACTFLEET_SANDBOX_MAX_MEMORY_MB"),
        ({"sandbox": {"cpus": 16}}, "sandbox.cpus", "ACTFLEET_SANDBOX_MAX_CPUS"),
    ],
)
def test_specs_that_cannot_run_get_422_naming_the_field_and_the_fix(
    fleet: Fleet, patch: dict[str, Any], where: str, fix: str
) -> None:
    one, lines, array = post_both(fleet, json.dumps(spec(**patch)).encode())
    for r in (one, lines, array):
        assert r.status_code == 422, r.text
    [problem] = one.json()["detail"]["problems"]
    assert problem.startswith(f"{where}: ") and fix in problem
    assert lines.json()["detail"]["errors"] == [{"line": 1, "problems": [problem]}]
    assert fleet.redis.llen(TASK_QUEUE) == 0


def test_what_stays_within_the_rules_is_accepted(fleet: Fleet) -> None:
    ok = spec(
        custom_id="row-1",
        files=[
            {"path": "data/in put.csv", "content_b64": B64},
            {"path": ".cfg", "content_b64": ""},
        ],
        expected={"answer": "^(a+)+$", "grader": "regex"},  # harmless under RE2
        sandbox={"memory_mb": 4096, "cpus": 4},
        llm={"seed": 2**63 - 1},
        limits={"max_turns": 3.0},
    )
    with fleet.client() as c:
        r = c.post("/v1/tasks", json=ok)
    assert r.status_code == 202, r.text


def test_one_bad_stored_record_does_not_break_the_tenants_reads(fleet: Fleet) -> None:
    # Given records stored before lone surrogates were refused: one in a task's metadata,
    # and one in a finished task's answer (from the model server's JSON)
    with fleet.client() as c:
        batch = c.post("/v1/batches", json=[spec(custom_id="a"), spec(custom_id="b")]).json()
        ok_id, poisoned_answer = [
            t["id"]
            for t in sorted(c.get("/v1/tasks").json()["tasks"], key=lambda t: t["custom_id"])
        ]
    legacy = TaskRecord(
        id="task_legacy", tenant="acme", spec=TaskSpec(prompt="p\udfff", metadata={"k": "\udfff"})
    )
    fleet.redis.hset(fleet.keys.task(legacy.id), mapping=legacy.to_hash())  # type: ignore[arg-type]
    fleet.redis.zadd(fleet.keys.tenant_tasks("acme"), {legacy.id: legacy.created_at + 1})
    fleet.start_task(poisoned_answer)
    fleet.finish(poisoned_answer, answer="x\ud800y")
    # When the tenant reads its tasks, one of them, and the batch's results
    with fleet.client() as c:
        listing = c.get("/v1/tasks")
        one = c.get(f"/v1/tasks/{legacy.id}")
        answered = c.get(f"/v1/tasks/{poisoned_answer}")
        results = c.get(f"/v1/batches/{batch['id']}/results")
        fine = c.get(f"/v1/tasks/{ok_id}")
    # Then every read answers, with the unencodable text replaced
    assert listing.status_code == 200, listing.text
    assert {t["id"] for t in listing.json()["tasks"]} == {legacy.id, ok_id, poisoned_answer}
    assert one.status_code == 200 and one.json()["metadata"] == {"k": "\ufffd"}
    assert answered.status_code == 200 and answered.json()["result"]["answer"] == "x\ufffdy"
    assert results.status_code == 200
    lines = [json.loads(line) for line in results.text.splitlines()]
    assert [line["custom_id"] for line in lines] == ["a", "b"]
    assert fine.status_code == 200 and fine.json()["status"] == "queued"
    assert Status(answered.json()["status"]) is Status.COMPLETED
    assert Result.from_dict(answered.json()["result"]).answer == "x\ufffdy"
