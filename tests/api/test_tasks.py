"""Tasks over HTTP: submit, read, list, auth, tenant isolation, bad input, limits, cancel."""

from __future__ import annotations

import base64
import json

from agent.models import Status
from store.keys import TASK_QUEUE
from tests.api.conftest import Fleet, spec


def test_submit_stores_the_task_queues_it_and_records_the_queued_event(fleet: Fleet) -> None:
    # given a tenant's key
    with fleet.client("acme") as c:
        # when it submits a task
        r = c.post("/v1/tasks", json=spec(custom_id="q1", metadata={"run": "a"}))
        # then it gets 202 and an id it can read back as queued
        assert r.status_code == 202, r.text
        task_id = r.json()["id"]
        assert r.headers["location"] == f"/v1/tasks/{task_id}"
        task = c.get(f"/v1/tasks/{task_id}").json()
    assert task["status"] == "queued"
    assert task["custom_id"] == "q1"
    assert task["metadata"] == {"run": "a"}
    # and a Celery message names the task, and the stream starts with task.queued
    [message] = fleet.redis.lrange(TASK_QUEUE, 0, -1)
    body = json.loads(base64.b64decode(json.loads(message)["body"]))
    assert body[0] == [task_id]
    # (kept in the record until the task starts: its stream begins then)
    event = json.loads(fleet.redis.hget(fleet.keys.task(task_id), "queued_event"))  # type: ignore[arg-type]
    assert event["type"] == "task.queued" and event["data"]["task_id"] == task_id
    assert not fleet.redis.exists(fleet.keys.events(task_id))
    assert fleet.active("acme") == 1


def test_requests_without_a_valid_key_get_401_saying_how_to_authenticate(fleet: Fleet) -> None:
    with fleet.client(None) as c:
        missing = c.get("/v1/tasks")
        wrong = c.get("/v1/tasks", headers={"Authorization": "Bearer af_nope"})
    assert missing.status_code == 401
    assert "Authorization: Bearer" in missing.json()["detail"]["message"]
    assert missing.headers["www-authenticate"] == "Bearer"
    assert wrong.status_code == 401
    assert "invalid" in wrong.json()["detail"]["message"]


def test_a_tenant_cannot_see_or_touch_another_tenants_task(fleet: Fleet) -> None:
    # given a task of tenant A
    with fleet.client("tenant-a") as a:
        task_id = a.post("/v1/tasks", json=spec()).json()["id"]
    # when tenant B asks for it in any way, then it does not exist for B
    with fleet.client("tenant-b") as b:
        assert b.get(f"/v1/tasks/{task_id}").status_code == 404
        assert b.get(f"/v1/tasks/{task_id}/events").status_code == 404
        assert b.post(f"/v1/tasks/{task_id}/cancel").status_code == 404
        assert b.get("/v1/tasks").json()["tasks"] == []
    assert fleet.redis.hget(fleet.keys.task(task_id), "status") == b"queued"


def test_an_invalid_spec_gets_422_listing_every_problem(fleet: Fleet) -> None:
    bad = {"prompt": "", "limits": {"max_turns": 0}, "colour": "red"}
    with fleet.client() as c:
        r = c.post("/v1/tasks", json=bad)
    assert r.status_code == 422
    problems = r.json()["detail"]["problems"]
    assert "prompt: must not be blank" in problems
    assert "limits.max_turns: must be between 1 and 200, got 0" in problems
    assert any(p.startswith("colour: unknown field") for p in problems)
    assert fleet.redis.llen(TASK_QUEUE) == 0


def test_what_the_server_does_not_grant_is_refused_before_queueing(fleet: Fleet) -> None:
    # Given a server that gives tasks no network and runs one sandbox image
    wants_network = {"prompt": "x", "sandbox": {"network": True}}
    other_image = {"prompt": "x", "sandbox": {"image": "python:3.12"}}
    with fleet.client() as c:
        # When tasks ask for more, alone or in a batch
        one = c.post("/v1/tasks", json=wants_network)
        batch = c.post("/v1/batches", json=[{"prompt": "fine"}, other_image])
    # Then they get a 422 that says what to change, and nothing is queued
    assert one.status_code == 422
    assert one.json()["detail"]["problems"][0].startswith(
        "sandbox.network: this server does not give tasks network access"
    )
    assert batch.status_code == 422
    [error] = batch.json()["detail"]["errors"]
    assert error["line"] == 2 and error["problems"][0].startswith("sandbox.image:")
    assert fleet.redis.llen(TASK_QUEUE) == 0


def test_malformed_json_gets_400_with_line_and_column(fleet: Fleet) -> None:
    with fleet.client() as c:
        r = c.post("/v1/tasks", content=b'{"prompt": "x",\n "limits": {,}}')
        empty = c.post("/v1/tasks", content=b"")
    assert r.status_code == 400
    assert "line 2, column" in r.json()["detail"]["message"]
    assert empty.status_code == 400


def test_bad_query_parameters_get_422_naming_the_parameter(fleet: Fleet) -> None:
    with fleet.client() as c:
        r = c.get("/v1/tasks", params={"status": "sleeping", "limit": 0})
    assert r.status_code == 422
    message = r.json()["detail"]["message"]
    assert "status" in message and "limit" in message


def test_a_body_over_the_size_limit_gets_413(make_fleet) -> None:  # type: ignore[no-untyped-def]
    fleet = make_fleet(max_request_bytes=1000)
    with fleet.client() as c:
        r = c.post("/v1/tasks", json=spec("x" * 2000))
    assert r.status_code == 413
    assert "1000 bytes" in r.json()["detail"]["message"]


def test_a_tenant_over_its_active_limit_gets_429_with_retry_after(make_fleet) -> None:  # type: ignore[no-untyped-def]
    fleet = make_fleet(max_active_per_tenant=2)
    with fleet.client("busy") as c, fleet.client("other") as other:
        ids = [c.post("/v1/tasks", json=spec()).json()["id"] for _ in range(2)]
        r = c.post("/v1/tasks", json=spec())
        assert r.status_code == 429
        assert int(r.headers["retry-after"]) > 0
        assert "limit of 2" in r.json()["detail"]["message"]
        # another tenant is not affected
        assert other.post("/v1/tasks", json=spec()).status_code == 202
        # when one task finishes, there is room again
        fleet.start_task(ids[0])
        fleet.finish(ids[0])
        assert c.post("/v1/tasks", json=spec()).status_code == 202


def test_list_pages_newest_first_and_filters_by_status(fleet: Fleet) -> None:
    with fleet.client() as c:
        ids = [c.post("/v1/tasks", json=spec(custom_id=f"t{i}")).json()["id"] for i in range(5)]
        fleet.start_task(ids[1])
        fleet.finish(ids[1])
        first = c.get("/v1/tasks", params={"limit": 3}).json()
        second = c.get("/v1/tasks", params={"limit": 3, "cursor": first["next_cursor"]}).json()
        done = c.get("/v1/tasks", params={"status": "completed"}).json()
    seen = [t["id"] for t in first["tasks"] + second["tasks"]]
    assert sorted(seen) == sorted(ids) and len(seen) == 5
    assert second["next_cursor"] is None
    assert [t["id"] for t in done["tasks"]] == [ids[1]]
    assert done["tasks"][0]["result"]["answer"] == "42"


def test_cancelling_a_queued_task_finishes_it_at_once_with_a_terminal_event(fleet: Fleet) -> None:
    with fleet.client() as c:
        task_id = c.post("/v1/tasks", json=spec()).json()["id"]
        r = c.post(f"/v1/tasks/{task_id}/cancel")
        assert r.status_code == 202
        assert r.json()["status"] == "cancelled"
        assert r.json()["result"]["failure_class"] == "cancelled"
        again = c.post(f"/v1/tasks/{task_id}/cancel")
    assert again.status_code == 409
    events = [json.loads(f[b"e"]) for _, f in fleet.redis.xrange(fleet.keys.events(task_id))]
    assert [e["type"] for e in events] == ["task.queued", "task.finished"]
    assert events[-1]["data"]["status"] == "cancelled"
    assert fleet.active("acme") == 0


def test_cancelling_a_running_task_flags_it_for_its_worker(fleet: Fleet) -> None:
    with fleet.client() as c:
        task_id = c.post("/v1/tasks", json=spec()).json()["id"]
        fleet.start_task(task_id)
        r = c.post(f"/v1/tasks/{task_id}/cancel")
    # then the record stays running (its worker owns it) but says stop
    assert r.status_code == 202
    assert r.json()["status"] == "running"
    assert r.json()["cancel_requested"] is True
    assert fleet.redis.hget(fleet.keys.task(task_id), "cancel_requested") == b"1"
    # and when the worker stops it, it ends cancelled
    fleet.finish(task_id, Status.CANCELLED, answer=None)
    assert fleet.redis.hget(fleet.keys.task(task_id), "status") == b"cancelled"


def test_ops_endpoints(fleet: Fleet) -> None:
    with fleet.client(None) as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        assert c.get("/readyz").status_code == 200
        assert "/v1/batches" in c.get("/openapi.json").json()["paths"]
        assert c.get("/docs").status_code == 200
