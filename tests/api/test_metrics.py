"""/metrics: request counts by route template, tasks submitted, finished tasks by status."""

from __future__ import annotations

from agent.models import Status
from tests.api.conftest import Fleet, spec


def test_metrics_show_requests_by_route_and_finished_tasks_by_status(fleet: Fleet) -> None:
    # given a submitted task, one read of it, and fleet counts kept in Redis by FINISH
    with fleet.client() as c:
        task_id = c.post("/v1/tasks", json=spec()).json()["id"]
        c.get(f"/v1/tasks/{task_id}")
        c.get("/v1/tasks/task_nope")
    # (kept per shard, summed on the page)
    fleet.redis.hset(fleet.keys.finished_counts(0), mapping={"completed": 2, "failed": 1})
    fleet.redis.hset(fleet.keys.finished_counts(5), mapping={"completed": 1})
    # when Prometheus scrapes
    with fleet.client(None) as c:
        page = c.get("/metrics").text
    # then routes appear as templates (never ids), with their status codes
    assert 'actfleet_http_requests_total{method="POST",route="/v1/tasks",status="202"} 1.0' in page
    assert 'route="/v1/tasks/{task_id}",status="200"} 1.0' in page
    assert 'route="/v1/tasks/{task_id}",status="404"} 1.0' in page
    assert task_id not in page
    assert "actfleet_tasks_submitted_total 1.0" in page
    # and finished tasks by status, fleet-wide
    assert 'actfleet_fleet_tasks_finished_total{status="completed"} 3.0' in page
    assert 'actfleet_fleet_tasks_finished_total{status="cancelled"} 0.0' in page
    assert "actfleet_fleet_queue_depth 1.0" in page


def test_finish_counts_finished_tasks_fleet_wide(fleet: Fleet) -> None:
    with fleet.client() as c:
        task_id = c.post("/v1/tasks", json=spec()).json()["id"]
        c.post(f"/v1/tasks/{task_id}/cancel")
    counts = fleet.redis.hgetall(fleet.keys.finished_counts(fleet.keys.shard(task_id)))
    assert counts == {Status.CANCELLED.value.encode(): b"1"}
