"""The event stream: every event once, in order; resume from Last-Event-ID; close at the end."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest

from actfleet.client import ApiError, AsyncClient, Client, SSEParser, StreamEvent
from agent.events import EventType
from tests.api.conftest import Fleet, spec


def read_stream(c: httpx.Client, task_id: str, **headers: str) -> list[StreamEvent]:
    parser = SSEParser()
    out = []
    with c.stream("GET", f"/v1/tasks/{task_id}/events", headers=headers) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            ev = parser.feed(line)
            if ev is not None:
                out.append(ev)
    return out  # the server closed the stream


def test_a_finished_task_replays_every_event_in_order_then_closes(fleet: Fleet) -> None:
    # given a task that ran two turns and finished
    with fleet.client() as c:
        task_id = c.post("/v1/tasks", json=spec()).json()["id"]
        fleet.start_task(task_id)
        for turn in (1, 2):
            fleet.append(task_id, EventType.LLM_REPLY, turn=turn, content=f"reply {turn}")
            fleet.append(task_id, EventType.EXEC_RESULT, turn=turn, output=f"out {turn}")
        fleet.finish(task_id, turns=2)
        # when a client reads the stream
        events = read_stream(c, task_id)
    # then it gets every event, once, in order, with stream ids as SSE ids, and it ends
    assert [e.type for e in events] == [
        "task.queued",
        "task.started",
        "llm.reply",
        "exec.result",
        "llm.reply",
        "exec.result",
        "task.finished",
    ]
    stored = [i.decode() for i, _ in fleet.redis.xrange(fleet.keys.events(task_id))]
    assert [e.id for e in events] == stored
    assert events[2].event["data"]["content"] == "reply 1"


def test_resuming_with_last_event_id_continues_after_that_event(fleet: Fleet) -> None:
    with fleet.client() as c:
        task_id = c.post("/v1/tasks", json=spec()).json()["id"]
        fleet.start_task(task_id)
        fleet.append(task_id, EventType.LLM_REPLY, turn=1)
        fleet.finish(task_id)
        full = read_stream(c, task_id)
        # when the client reconnects having seen the first two events
        resumed = read_stream(c, task_id, **{"Last-Event-ID": full[1].id})
        by_query = c.get(f"/v1/tasks/{task_id}/events", params={"last_event_id": full[2].id})
        bad = c.get(f"/v1/tasks/{task_id}/events", headers={"Last-Event-ID": "yesterday"})
    # then it gets exactly the rest
    assert [e.id for e in resumed] == [e.id for e in full[2:]]
    assert by_query.text.count("event: ") == 1 and "task.finished" in by_query.text
    assert bad.status_code == 400
    assert "Last-Event-ID" in bad.json()["detail"]["message"]


def test_a_live_stream_delivers_events_as_the_worker_appends_them(fleet: Fleet) -> None:
    # given a client following a queued task (heartbeats every 0.5 s in these tests)
    with fleet.client() as c:
        task_id = c.post("/v1/tasks", json=spec()).json()["id"]
        received: list[StreamEvent] = []
        reader = threading.Thread(target=lambda: received.extend(read_stream(c, task_id)))
        reader.start()
        # when the worker works slowly, past a few heartbeats
        time.sleep(0.3)
        fleet.start_task(task_id)
        for turn in range(1, 4):
            time.sleep(0.4)
            fleet.append(task_id, EventType.LLM_REPLY, turn=turn)
        fleet.finish(task_id, turns=3)
        reader.join(timeout=10)
    # then the stream carried each event once, in order, and closed after the last
    assert not reader.is_alive()
    types = [e.type for e in received]
    assert types == ["task.queued", "task.started", *["llm.reply"] * 3, "task.finished"]
    assert [e.event["turn"] for e in received if e.type == "llm.reply"] == [1, 2, 3]


def test_the_client_follows_a_stream_across_a_dropped_connection(fleet: Fleet) -> None:
    # given a task with events, and a client that saw only the first of them
    key = fleet.key_for("acme")
    with Client(fleet.url, key) as client:
        task_id = client.submit(spec())["id"]
        fleet.start_task(task_id)
        fleet.append(task_id, EventType.LLM_REPLY, turn=1)
        first = next(iter(client.events(task_id)))
        fleet.finish(task_id)
        # when it reconnects from that event, then it sees the rest exactly once
        rest = list(client.events(task_id, last_event_id=first.id))
    assert first.type == "task.queued"
    assert [e.type for e in rest] == ["task.started", "llm.reply", "task.finished"]


class FlakyTransport(httpx.BaseTransport):
    """A real HTTP transport whose first ``drops`` connections fail, recording every
    request's Last-Event-ID."""

    def __init__(self, drops: int) -> None:
        self.real = httpx.HTTPTransport()
        self.drops = drops
        self.resumed_from: list[str | None] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.resumed_from.append(request.headers.get("Last-Event-ID"))
        if self.drops > 0:
            self.drops -= 1
            raise httpx.ConnectError("connection dropped", request=request)
        return self.real.handle_request(request)


class AsyncFlakyTransport(httpx.AsyncBaseTransport):
    def __init__(self, drops: int) -> None:
        self.real = httpx.AsyncHTTPTransport()
        self.drops = drops
        self.resumed_from: list[str | None] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.resumed_from.append(request.headers.get("Last-Event-ID"))
        if self.drops > 0:
            self.drops -= 1
            raise httpx.ConnectError("connection dropped", request=request)
        return await self.real.handle_async_request(request)


def _task_with_events(fleet: Fleet, key: str) -> tuple[str, str]:
    """A finished task of four events; returns its id and the first event's stream id."""
    with Client(fleet.url, key) as client:
        task_id = client.submit(spec())["id"]
        fleet.start_task(task_id)
        fleet.append(task_id, EventType.LLM_REPLY, turn=1)
        fleet.finish(task_id)
        first = next(iter(client.events(task_id)))
    return task_id, first.id


def test_both_clients_reconnect_after_failed_connections_from_the_last_event(
    fleet: Fleet,
) -> None:
    # given a task whose first event a client has seen
    key = fleet.key_for("acme")
    task_id, first_id = _task_with_events(fleet, key)

    # when the sync client's next two connections fail
    flaky = FlakyTransport(drops=2)
    with Client(fleet.url, key, transport=flaky) as client:
        rest = [e.type for e in client.events(task_id, last_event_id=first_id)]

    async def follow() -> tuple[list[str], AsyncFlakyTransport]:
        transport = AsyncFlakyTransport(drops=2)
        async with AsyncClient(fleet.url, key, transport=transport) as client:
            types = [e.type async for e in client.events(task_id, last_event_id=first_id)]
        return types, transport

    # and so do the asyncio client's
    async_rest, async_flaky = asyncio.run(follow())

    # then each retried from the event it had seen and got the rest exactly once
    assert rest == async_rest == ["task.started", "llm.reply", "task.finished"]
    assert flaky.resumed_from == async_flaky.resumed_from == [first_id] * 3


def test_a_stream_that_keeps_failing_gives_up_after_its_reconnects(fleet: Fleet) -> None:
    key = fleet.key_for("acme")
    task_id, _ = _task_with_events(fleet, key)
    with (
        Client(fleet.url, key, transport=FlakyTransport(drops=10)) as client,
        pytest.raises(ApiError, match=f"lost the event stream of {task_id}"),
    ):
        list(client.events(task_id, reconnects=1))


def test_a_cancelled_queued_task_streams_its_terminal_event(fleet: Fleet) -> None:
    with fleet.client() as c:
        task_id = c.post("/v1/tasks", json=spec()).json()["id"]
        c.post(f"/v1/tasks/{task_id}/cancel")
        events = read_stream(c, task_id)
    assert [e.type for e in events] == ["task.queued", "task.finished"]
    assert json.loads(json.dumps(events[-1].event))["data"]["status"] == "cancelled"
