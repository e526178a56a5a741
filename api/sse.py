"""A task's Redis stream as Server-Sent Events.

One loop does replay and live tail alike: ``XREAD BLOCK`` after the last id sent returns
the stored entries at once when there are some and waits for new ones otherwise, so each
event goes out exactly once, in stream order, and a client that reconnects with
``Last-Event-ID`` continues right after the last event it saw. The stream closes after
``task.finished``; an idle stream gets a comment every ``sse_heartbeat_s`` so proxies keep
it open for as long as its task runs (the blocking read's client has a socket timeout
longer than that, see ``api.app``), and is closed if its task turns out to be terminal
with nothing left to send (a stream that expired or was trimmed).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import structlog
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from agent.events import EventType
from agent.models import TERMINAL_STATUSES
from agent.text import text_of
from api.errors import ApiError
from store.intake import QUEUED_ID
from store.keys import EVENT_FIELD
from store.staging import QUEUED_FIELD

READ_COUNT = 500
STORE_RETRY_S = 2.0  # while Redis is unreachable, how often a stream tries it again
log = structlog.get_logger("actfleet.api")
# fullmatch (no trailing newline); 19 digits: each part must fit Redis's unsigned 64 bits
STREAM_ID = "[0-9]{1,19}(?:-[0-9]{1,19})?"
_STREAM_ID = re.compile(STREAM_ID)


def check_event_id(value: str | None) -> str:
    """The id to read after: ``0-0`` (from the start) or a well-formed stream id."""
    if value is None or value in ("", "0"):
        return "0-0"
    if not _STREAM_ID.fullmatch(value):
        raise ApiError(
            400, f"Last-Event-ID must be a stream id like '1712345678901-0', got {value!r}"
        )
    return value if "-" in value else f"{value}-0"


def format_event(entry_id: str, fields: dict[str, str]) -> tuple[str, bool]:
    """The SSE frame for one stream entry, and whether it is the terminal event."""
    raw = fields.get(EVENT_FIELD, "{}")
    try:
        etype = str(json.loads(raw).get("type", "message"))
    except (ValueError, AttributeError):
        etype = "message"
    # Event JSON is compact (no newlines), so it fits one `data:` line.
    data = raw.replace("\n", "\\n")
    return f"id: {entry_id}\nevent: {etype}\ndata: {data}\n\n", etype == EventType.FINISHED


async def event_stream(state: Any, tenant: str, task_id: str, after: str) -> AsyncIterator[str]:
    """The frames of the task's stream after ``after``, until its terminal event.

    While Redis is unreachable (a restart) the stream stays open: it sends a comment
    every ``sse_heartbeat_s`` and reads on where it stopped once Redis answers again, so
    a client sees neither a gap nor an end that is not the task's."""
    client = state.stream_redis
    stream = state.keys.events(task_id)
    heartbeat_s = state.settings.sse_heartbeat_s
    last = after
    down = False
    yield "retry: 2000\n\n"
    if after == "0-0":
        frame = await _waiting(state, client, stream, task_id)
        if frame is not None:
            yield frame
            last = QUEUED_ID
    while True:
        try:
            frames, terminal, last = await _read(state, client, stream, task_id, last)
        except (RedisConnectionError, RedisTimeoutError) as e:
            if not down:
                log.warning("sse.redis_unavailable", task_id=task_id, error=repr(e))
            down = True
            yield ": waiting for the store\n\n"
            await asyncio.sleep(min(heartbeat_s, STORE_RETRY_S))
            continue
        down = False
        for frame in frames:
            yield frame
        if terminal:
            return
        if not frames:
            yield ": keep-alive\n\n"


async def _waiting(state: Any, client: Any, stream: str, task_id: str) -> str | None:
    """The frame of a waiting task's ``task.queued`` event, which is in its record until
    the task starts (``store.intake.MATERIALIZE``), under the id it will have in the
    stream; None once the stream has it. Raises Redis errors."""
    pipe = client.pipeline(transaction=False)
    pipe.exists(stream)
    pipe.hget(state.keys.task(task_id), QUEUED_FIELD)
    started, event = await pipe.execute()
    if started or event is None:
        return None
    return format_event(QUEUED_ID, {EVENT_FIELD: text_of(event)})[0]


async def _read(
    state: Any, client: Any, stream: str, task_id: str, last: str
) -> tuple[list[str], bool, str]:
    """One blocking read after ``last``: (frames, whether the stream is over, new last)."""
    block_ms = int(state.settings.sse_heartbeat_s * 1000)
    reply = await client.xread({stream: last}, count=READ_COUNT, block=block_ms)
    if reply:
        return _frames(reply, last)
    status = await client.hget(state.keys.task(task_id), "status")
    if status is None or text_of(status) in TERMINAL_STATUSES:
        # FINISH sets the status and appends task.finished atomically, so one more
        # read tells "finished just now" from "its events expired or were trimmed".
        reply = await client.xread({stream: last}, count=READ_COUNT)
        return _frames(reply, last) if reply else ([], True, last)
    return [], False, last


def _frames(reply: Any, last: str) -> tuple[list[str], bool, str]:
    frames = []
    for entry_id, fields in reply[0][1]:
        frame, terminal = format_event(
            text_of(entry_id), {text_of(k): text_of(v) for k, v in fields.items()}
        )
        last = text_of(entry_id)
        frames.append(frame)
        if terminal:
            return frames, True, last
    return frames, False, last
