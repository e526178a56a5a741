"""The API across Redis trouble, over real HTTP (uvicorn) and a real redis-server: long
quiet event streams stay open, and a Redis restart costs no request a 503."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import httpx
import redis

from agent.events import EventType
from tests.api.conftest import Fleet, spec
from tests.conftest import RedisServer


def raw_stream(c: httpx.Client, task_id: str, lines: list[tuple[float, str]]) -> None:
    with c.stream("GET", f"/v1/tasks/{task_id}/events", timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            lines.append((time.monotonic(), line))


def test_an_event_stream_stays_open_with_heartbeats_while_its_task_is_quiet(
    make_fleet: Any,
) -> None:
    # given heartbeats every 8 s (longer than redis-py's default 5 s socket timeout) and
    # a running task that sends nothing for 14 s (a long model call, a slow cell)
    fleet: Fleet = make_fleet(sse_heartbeat_s=8.0)
    with fleet.client() as c:
        task_id = c.post("/v1/tasks", json=spec()).json()["id"]
        fleet.start_task(task_id)
        lines: list[tuple[float, str]] = []
        reader = threading.Thread(target=raw_stream, args=(c, task_id, lines))
        started = time.monotonic()
        reader.start()
        time.sleep(14)
        # when the task speaks again and finishes
        fleet.append(task_id, EventType.LLM_REPLY, turn=1, content="done thinking")
        fleet.finish(task_id)
        reader.join(timeout=30)

    # then the stream stayed open throughout, kept alive, and carried the rest
    assert not reader.is_alive()
    text = [line for _, line in lines]
    assert ": keep-alive" in text
    assert "event: llm.reply" in text and "event: task.finished" in text
    first_keepalive = next(t for t, line in lines if line == ": keep-alive")
    assert first_keepalive - started > 5  # a heartbeat after the old timeout
    assert lines[-1][0] - started > 14  # open until the task finished


def test_an_event_stream_stays_open_across_a_redis_restart_and_misses_nothing(
    make_fleet: Any, redis_server: RedisServer
) -> None:
    # given a client following a running task
    fleet: Fleet = make_fleet(sse_heartbeat_s=1.0)
    with fleet.client() as c:
        task_id = c.post("/v1/tasks", json=spec()).json()["id"]
        fleet.start_task(task_id)
        lines: list[tuple[float, str]] = []
        reader = threading.Thread(target=raw_stream, args=(c, task_id, lines))
        reader.start()
        time.sleep(1.5)  # the AOF has the task

        # when Redis is down for a few seconds, and the task goes on after it is back
        redis_server.kill()
        time.sleep(4)
        redis_server.start()
        fleet.redis = redis.Redis.from_url(redis_server.url)  # the old one's socket is dead
        fleet.append(task_id, EventType.LLM_REPLY, turn=1, content="after the restart")
        fleet.finish(task_id)
        reader.join(timeout=30)

    # then the same stream waited through the outage and carried every event, in order
    assert not reader.is_alive()
    text = [line for _, line in lines]
    assert ": waiting for the store" in text
    events = [line.removeprefix("event: ") for line in text if line.startswith("event: ")]
    assert events == ["task.queued", "task.started", "llm.reply", "task.finished"]


def test_the_first_requests_after_a_redis_restart_succeed(
    make_fleet: Any, redis_server: RedisServer
) -> None:
    fleet: Fleet = make_fleet()
    with fleet.client() as c:
        for _ in range(2):
            # given an API whose pooled connections all went to the Redis that was
            assert c.get("/v1/tasks").status_code == 200
            assert c.post("/v1/tasks", json=spec()).status_code == 202
            assert c.get("/readyz").status_code == 200
            time.sleep(1.2)  # the AOF has it
            redis_server.kill()
            redis_server.start()
            # then each kind of request, on a stale connection, reconnects and succeeds
            assert c.get("/readyz").status_code == 200
            assert c.get("/v1/tasks").status_code == 200
            resp = c.post("/v1/tasks", json=spec())
            assert resp.status_code == 202, resp.text


def test_readyz_reports_the_queue_and_the_workers_whose_consumer_is_dead(fleet: Fleet) -> None:
    # given a queued task and two workers' heartbeats, one reporting a dead consumer
    with fleet.client() as c:
        assert c.post("/v1/tasks", json=spec()).status_code == 202
    now = time.time()
    for worker, consumer in (("w-ok", "ok"), ("w-dead", "stalled")):
        fleet.redis.set(f"t:worker:{worker}", json.dumps({"leases": 0, "consumer": consumer}))
        fleet.redis.zadd("t:workers", {worker: now})
    fleet.redis.zadd("t:workers", {"w-gone": now - 3600})  # stopped beating long ago

    # then readiness is fine (the API can take tasks) and says what it depends on
    resp = httpx.get(f"{fleet.url}/readyz")
    assert resp.status_code == 200
    body = resp.json()
    assert body["redis"] == "ok"
    assert body["queue"] == {"name": "actfleet", "depth": 1}
    assert body["workers"] == {"alive": 2, "consumer_stalled": ["w-dead"]}
