"""Batches: all-or-nothing validation with line numbers, fast submit, stats, results, cancel."""

from __future__ import annotations

import json
import time

import pytest
from pydantic import ValidationError

from agent.models import Status, Usage
from store.keys import TASK_QUEUE
from tests.api.conftest import Fleet, fleet_settings, spec


def jsonl(*specs: object) -> bytes:
    return b"".join(json.dumps(s).encode() + b"\n" for s in specs)


def test_a_batch_with_bad_lines_is_rejected_whole_with_every_bad_line_named(fleet: Fleet) -> None:
    body = (
        jsonl(spec(custom_id="a"), spec(custom_id="b"))
        + b"\n"  # a blank line is skipped but counted
        + jsonl({"prompt": "x", "limits": {"max_turns": 0}}, spec(custom_id="a"))
        + b'{"prompt": "unterminated\n'
    )
    with fleet.client() as c:
        r = c.post("/v1/batches", content=body)
    assert r.status_code == 400  # a line is not JSON at all
    detail = r.json()["detail"]
    assert detail["message"] == "3 of 5 lines are invalid; nothing was queued"
    by_line = {e["line"]: e["problems"] for e in detail["errors"]}
    assert by_line[4] == ["limits.max_turns: must be between 1 and 200, got 0"]
    assert "is also used on line 1" in by_line[5][0]
    assert "not valid JSON" in by_line[6][0]
    assert fleet.redis.llen(TASK_QUEUE) == 0
    assert fleet.redis.keys("t:{*}:task:*") == []


def test_invalid_specs_alone_get_422_and_an_empty_batch_says_so(fleet: Fleet) -> None:
    with fleet.client() as c:
        r = c.post("/v1/batches", content=jsonl(spec(), {"prompt": 3}))
        empty = c.post("/v1/batches", content=b"\n\n")
    assert r.status_code == 422
    assert r.json()["detail"]["errors"] == [
        {"line": 2, "problems": ["prompt: expected a string, got a number"]}
    ]
    assert empty.status_code == 422
    assert "no tasks" in empty.json()["detail"]["message"]


def test_a_batch_over_the_task_limit_gets_413(make_fleet) -> None:  # type: ignore[no-untyped-def]
    fleet = make_fleet(max_batch_tasks=3)
    with fleet.client() as c:
        r = c.post("/v1/batches", content=jsonl(*[spec()] * 4))
    assert r.status_code == 413
    assert "limit is 3" in r.json()["detail"]["message"]


def test_a_batch_larger_than_the_tenants_free_room_gets_429_and_queues_nothing(make_fleet) -> None:  # type: ignore[no-untyped-def]
    fleet = make_fleet(max_active_per_tenant=10, max_batch_tasks=10)
    with fleet.client() as c:
        assert c.post("/v1/batches", content=jsonl(*[spec()] * 5)).status_code == 202
        queued = fleet.redis.llen(TASK_QUEUE)
        r = c.post("/v1/batches", content=jsonl(*[spec()] * 6))
    assert r.status_code == 429 and "retry-after" in r.headers
    assert fleet.redis.llen(TASK_QUEUE) == queued


def test_a_batch_that_could_never_fit_the_tenant_budget_gets_413_not_429() -> None:
    # Given the default limits (a batch is capped at what a tenant may have unfinished)
    settings = fleet_settings("redis://127.0.0.1:1/0")
    assert settings.max_batch_tasks <= settings.max_active_per_tenant
    # Then limits that would let a batch outgrow the tenant budget refuse to start
    with pytest.raises(ValidationError, match=r"ACTFLEET_MAX_BATCH_TASKS .* is above"):
        fleet_settings(
            "redis://127.0.0.1:1/0", max_batch_tasks=20_000, max_active_per_tenant=10_000
        )


def test_a_batch_over_the_tenant_budget_is_413_naming_the_limit(make_fleet) -> None:  # type: ignore[no-untyped-def]
    fleet = make_fleet(max_active_per_tenant=10, max_batch_tasks=10)
    with fleet.client() as c:
        r = c.post("/v1/batches", content=jsonl(*[spec()] * 11))
    assert r.status_code == 413 and "retry-after" not in r.headers
    assert "holds 11 tasks; the limit is 10" in r.json()["detail"]["message"]
    assert fleet.redis.llen(TASK_QUEUE) == 0


def test_two_thousand_tasks_submit_in_seconds_and_results_keep_input_order(fleet: Fleet) -> None:
    # given a 2,000-line batch file
    n = 2000
    body = jsonl(*[spec(f"task {i}", custom_id=f"c{i}") for i in range(n)])
    with fleet.client() as c:
        # when it is submitted
        t0 = time.perf_counter()
        r = c.post("/v1/batches", content=body)
        elapsed = time.perf_counter() - t0
        assert r.status_code == 202, r.text
        batch_id = r.json()["id"]
        print(f"\n2,000-task batch submitted in {elapsed:.2f} s")
        # then it is queued fast, every task enqueued
        assert elapsed < 10
        assert fleet.redis.llen(TASK_QUEUE) == n
        status = c.get(f"/v1/batches/{batch_id}").json()
        assert status["total"] == n and status["counts"]["queued"] == n
        assert status["status"] == "running" and status["success_rate"] is None
        # and the results come back as JSONL in input order, keyed by custom_id
        lines = c.get(f"/v1/batches/{batch_id}/results").text.splitlines()
    assert [json.loads(line)["custom_id"] for line in lines] == [f"c{i}" for i in range(n)]


def test_batch_status_counts_success_rate_turns_and_tokens(fleet: Fleet) -> None:
    # given a batch of four: right, wrong, failed, still queued
    with fleet.client() as c:
        batch_id = c.post(
            "/v1/batches", content=jsonl(*[spec(custom_id=f"c{i}") for i in range(4)])
        ).json()["id"]
        ids = [
            json.loads(line)["task_id"]
            for line in c.get(f"/v1/batches/{batch_id}/results").text.splitlines()
        ]
        for task_id in ids[:3]:
            fleet.start_task(task_id)
        fleet.finish(ids[0], correct=True, turns=2, usage=Usage(100, 10, 2))
        fleet.finish(ids[1], correct=False, turns=4, usage=Usage(200, 20, 4))
        fleet.finish(ids[2], Status.FAILED, answer=None, turns=6, usage=Usage(300, 30, 6))
        # when its status is read
        status = c.get(f"/v1/batches/{batch_id}").json()
        results = [
            json.loads(x) for x in c.get(f"/v1/batches/{batch_id}/results").text.splitlines()
        ]
        with_messages = c.get(f"/v1/batches/{batch_id}/results", params={"include": "trajectory"})
        bad_include = c.get(f"/v1/batches/{batch_id}/results", params={"include": "everything"})
    # then it counts per status and summarises the finished ones
    assert status["counts"] == {
        "queued": 1,
        "running": 0,
        "completed": 2,
        "failed": 1,
        "error": 0,
        "cancelled": 0,
        "timed_out": 0,
    }
    assert status["finished"] == 3
    assert status["success_rate"] == round(1 / 3, 6)
    assert status["mean_turns"] == 4
    assert status["usage"] == {"prompt_tokens": 600, "completion_tokens": 60, "total_tokens": 660}
    assert [r["status"] for r in results] == ["completed", "completed", "failed", "queued"]
    assert results[0]["answer"] == "42" and results[0]["correct"] is True
    assert "messages" not in results[0]
    assert "messages" in json.loads(with_messages.text.splitlines()[0])
    assert bad_include.status_code == 422


def test_cancelling_a_batch_keeps_what_finished_and_stops_the_rest(fleet: Fleet) -> None:
    with fleet.client() as c:
        batch_id = c.post(
            "/v1/batches", content=jsonl(*[spec(custom_id=f"c{i}") for i in range(4)])
        ).json()["id"]
        ids = [
            json.loads(x)["task_id"]
            for x in c.get(f"/v1/batches/{batch_id}/results").text.splitlines()
        ]
        fleet.start_task(ids[0])
        fleet.finish(ids[0])
        fleet.start_task(ids[1])  # running: its worker will be told to stop
        r = c.post(f"/v1/batches/{batch_id}/cancel")
        assert r.status_code == 202
        assert r.json() == {"id": batch_id, "cancelled": 2, "stopping": 1, "already_finished": 1}
        fleet.finish(ids[1], Status.CANCELLED, answer=None)
        status = c.get(f"/v1/batches/{batch_id}").json()
    assert status["status"] == "cancelled"
    assert status["counts"]["completed"] == 1 and status["counts"]["cancelled"] == 3
    assert fleet.redis.hget(fleet.keys.task(ids[0]), "cancel_requested") != b"1"
    assert fleet.active("acme") == 0


def test_another_tenant_gets_404_for_a_batch(fleet: Fleet) -> None:
    with fleet.client("tenant-a") as a:
        batch_id = a.post("/v1/batches", content=jsonl(spec())).json()["id"]
    with fleet.client("tenant-b") as b:
        for path in ("", "/results"):
            assert b.get(f"/v1/batches/{batch_id}{path}").status_code == 404
        assert b.post(f"/v1/batches/{batch_id}/cancel").status_code == 404


def test_a_json_array_is_accepted_as_a_batch(fleet: Fleet) -> None:
    with fleet.client() as c:
        r = c.post("/v1/batches", json=[spec(), spec()])
        bad = c.post("/v1/batches", json=[spec(), {"prompt": None}])
    assert r.status_code == 202 and r.json()["total"] == 2
    assert bad.json()["detail"]["errors"] == [{"line": 2, "problems": ["prompt: is required"]}]
