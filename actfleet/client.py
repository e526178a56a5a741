"""A small HTTP client for the actfleet API, sync (``Client``) and asyncio (``AsyncClient``).

Both read ``ACTFLEET_API_URL`` / ``ACTFLEET_API_KEY`` through ``Settings`` when built with
``from_settings``. An error answer raises ``ApiError`` whose message is the server's "what
to fix" text (with each problem or bad batch line on its own line). ``events`` follows a
task's SSE stream and reconnects with ``Last-Event-ID`` after a dropped connection, so the
caller sees every event once, in order, ending with ``task.finished``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from agent.backoff import Backoff, Jitter
from agent.errors import ActfleetError
from config.settings import Settings

TERMINAL_EVENT = "task.finished"
_RECONNECT = Backoff(0.4, 5.0, Jitter.NONE)  # after a dropped event stream: 0.4 s, 0.8 s, ... 5 s
BatchBody = bytes | str | Path | Iterable[Mapping[str, Any]]
UPLOAD_CHUNK = 1 << 20  # bytes read from a batch file at a time while it is sent


class ApiError(ActfleetError):
    """The API answered with an error status (or could not be reached: ``status`` 0)."""

    def __init__(self, status: int, detail: Any) -> None:
        self.status = status
        self.detail = detail
        super().__init__(_describe(status, detail))


def _describe(status: int, detail: Any) -> str:
    where = f"HTTP {status}: " if status else ""  # 0: the API was not reached at all
    if not isinstance(detail, dict):
        return f"{where}{detail}"
    lines = [f"{where}{detail.get('message', detail)}"]
    for err in detail.get("errors") or []:
        for p in err.get("problems", []):
            lines.append(f"  line {err.get('line')}: {p}")
    return "\n".join(lines)  # a spec's problems are already in its message


def _check(resp: httpx.Response) -> None:
    if resp.is_success:
        return
    try:
        detail = resp.json().get("detail", resp.text)
    except ValueError:
        detail = resp.text
    raise ApiError(resp.status_code, detail)


@dataclass(frozen=True, slots=True)
class StreamEvent:
    id: str
    type: str
    event: dict[str, Any]  # the event JSON: type, turn, attempt, ts, data

    @property
    def terminal(self) -> bool:
        return self.type == TERMINAL_EVENT


class SSEParser:
    """Feeds lines of a ``text/event-stream``; returns an event at each blank line."""

    def __init__(self) -> None:
        self._id: str | None = None
        self._type = "message"
        self._data: list[str] = []

    def feed(self, line: str) -> StreamEvent | None:
        if line == "":
            out = None
            if self._data and self._id is not None:
                data = "\n".join(self._data)
                out = StreamEvent(self._id, self._type, json.loads(data))
            self._id, self._type, self._data = None, "message", []
            return out
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "id":
            self._id = value
        elif name == "event":
            self._type = value
        elif name == "data":
            self._data.append(value)
        return None


class _Resumable:
    """A task's event stream across reconnects, for both clients: where it resumes
    (``Last-Event-ID``), and how long to wait after a dropped connection, or when to give up.
    """

    def __init__(self, task_id: str, last_event_id: str | None, reconnects: int) -> None:
        self.task_id = task_id
        self.path = f"/v1/tasks/{task_id}/events"
        self.last_event_id = last_event_id
        self.reconnects = reconnects
        self.failures = 0

    def options(self) -> dict[str, Any]:
        """The request's headers and timeout: no read timeout, a task may be quiet for long."""
        headers = {"Last-Event-ID": self.last_event_id} if self.last_event_id else {}
        return {"headers": headers, "timeout": httpx.Timeout(60, read=None)}

    def seen(self, ev: StreamEvent) -> None:
        self.last_event_id = ev.id
        self.failures = 0

    def backoff_s(self, error: httpx.TransportError) -> float:
        """The delay before reconnecting; ``ApiError`` once ``reconnects`` ran out."""
        self.failures += 1
        if self.failures > self.reconnects:
            raise ApiError(0, f"lost the event stream of {self.task_id}: {error}") from error
        return _RECONNECT.delay_s(self.failures)


def _batch_content(body: BatchBody) -> bytes:
    if isinstance(body, Path):
        return body.read_bytes()
    if isinstance(body, bytes):
        return body
    if isinstance(body, str):
        return body.encode()
    return "".join(json.dumps(s, separators=(",", ":")) + "\n" for s in body).encode()


class _Base:
    def __init__(self, base_url: str, api_key: str | None) -> None:
        self.base_url = base_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}


class Client(_Base):
    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        timeout_s: float = 60.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(base_url, api_key)
        self.http = httpx.Client(
            base_url=self.base_url, headers=self.headers, timeout=timeout_s, transport=transport
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> Client:
        return cls(settings.api_url, settings.api_key)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def _call(self, method: str, path: str, **kw: Any) -> Any:
        try:
            resp = self.http.request(method, path, **kw)
        except httpx.TransportError as e:
            raise ApiError(0, f"cannot reach the API at {self.base_url}: {e}") from e
        _check(resp)
        return resp.json()

    def submit(self, spec: Mapping[str, Any]) -> dict[str, Any]:
        return self._call("POST", "/v1/tasks", json=dict(spec))

    def task(self, task_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/tasks/{task_id}")

    def tasks(
        self, status: str | None = None, limit: int = 50, cursor: str | None = None
    ) -> dict[str, Any]:
        params = {
            k: v for k, v in {"status": status, "limit": limit, "cursor": cursor}.items() if v
        }
        return self._call("GET", "/v1/tasks", params=params)

    def cancel(self, task_id: str) -> dict[str, Any]:
        return self._call("POST", f"/v1/tasks/{task_id}/cancel")

    def events(
        self, task_id: str, last_event_id: str | None = None, reconnects: int = 20
    ) -> Iterator[StreamEvent]:
        """Every event after ``last_event_id`` (all when None), until ``task.finished``."""
        stream = _Resumable(task_id, last_event_id, reconnects)
        while True:
            try:
                with self.http.stream("GET", stream.path, **stream.options()) as resp:
                    if not resp.is_success:
                        resp.read()
                        _check(resp)
                    parser = SSEParser()
                    for line in resp.iter_lines():
                        ev = parser.feed(line)
                        if ev is not None:
                            stream.seen(ev)
                            yield ev
                            if ev.terminal:
                                return
                return  # the server closed the stream: the task is over
            except httpx.TransportError as e:
                time.sleep(stream.backoff_s(e))

    def submit_batch(self, body: BatchBody, webhook_url: str | None = None) -> dict[str, Any]:
        """Queue a batch; ``webhook_url`` gets one signed ``batch.finished`` at its end. A
        ``Path`` is streamed from the file, never held in memory whole."""
        headers = {"Content-Type": "application/x-ndjson"}
        if isinstance(body, Path):
            headers["Content-Length"] = str(body.stat().st_size)
            with body.open("rb") as f:
                return self._call(
                    "POST",
                    "/v1/batches",
                    content=iter(lambda: f.read(UPLOAD_CHUNK), b""),
                    headers=headers,
                    params={"webhook_url": webhook_url} if webhook_url else None,
                )
        return self._call(
            "POST",
            "/v1/batches",
            content=_batch_content(body),
            headers=headers,
            params={"webhook_url": webhook_url} if webhook_url else None,
        )

    def batch(self, batch_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/batches/{batch_id}")

    def task_webhook(self, task_id: str) -> dict[str, Any]:
        """The task's webhook delivery: state and every attempt."""
        return self._call("GET", f"/v1/tasks/{task_id}/webhook")

    def batch_webhook(self, batch_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/batches/{batch_id}/webhook")

    def cancel_batch(self, batch_id: str) -> dict[str, Any]:
        return self._call("POST", f"/v1/batches/{batch_id}/cancel")

    def batch_results(self, batch_id: str, trajectory: bool = False) -> Iterator[dict[str, Any]]:
        params = {"include": "trajectory"} if trajectory else {}
        return self._jsonl(f"/v1/batches/{batch_id}/results", params)

    def export(
        self,
        batch_id: str,
        fmt: str = "results",
        *,
        only_correct: bool = False,
        only_completed: bool = False,
        max_turns: int | None = None,
        trajectory: bool = False,
    ) -> Iterator[dict[str, Any]]:
        """The lines of ``GET /v1/batches/{id}/export`` (see ``agent.export``)."""
        params: dict[str, Any] = {"format": fmt}
        if only_correct:
            params["only_correct"] = "true"
        if only_completed:
            params["only_completed"] = "true"
        if max_turns is not None:
            params["max_turns"] = max_turns
        if trajectory:
            params["include"] = "trajectory"
        return self._jsonl(f"/v1/batches/{batch_id}/export", params)

    def _jsonl(self, path: str, params: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
        try:
            with self.http.stream("GET", path, params=dict(params)) as resp:
                if not resp.is_success:
                    resp.read()
                    _check(resp)
                for line in resp.iter_lines():
                    if line:
                        yield json.loads(line)
        except httpx.TransportError as e:
            raise ApiError(0, f"cannot reach the API at {self.base_url}: {e}") from e

    def wait_batch(
        self,
        batch_id: str,
        poll_s: float = 1.0,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
        timeout_s: float | None = None,
    ) -> dict[str, Any]:
        """Poll until every task of the batch has finished; return the final status."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            status = self.batch(batch_id)
            if on_progress:
                on_progress(status)
            if status["finished"] >= status["total"]:
                return status
            if deadline is not None and time.monotonic() > deadline:
                raise ApiError(0, f"batch {batch_id} did not finish within {timeout_s} s")
            time.sleep(poll_s)


class AsyncClient(_Base):
    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        timeout_s: float = 60.0,
        transport: httpx.AsyncBaseTransport | None = None,
        max_connections: int = 100,
    ) -> None:
        super().__init__(base_url, api_key)
        self.http = httpx.AsyncClient(
            base_url=self.base_url,
            headers=self.headers,
            timeout=timeout_s,
            transport=transport,
            limits=httpx.Limits(max_connections=max_connections),
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> AsyncClient:
        return cls(settings.api_url, settings.api_key)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.http.aclose()

    async def _call(self, method: str, path: str, **kw: Any) -> Any:
        try:
            resp = await self.http.request(method, path, **kw)
        except httpx.TransportError as e:
            raise ApiError(0, f"cannot reach the API at {self.base_url}: {e}") from e
        _check(resp)
        return resp.json()

    async def submit(self, spec: Mapping[str, Any]) -> dict[str, Any]:
        return await self._call("POST", "/v1/tasks", json=dict(spec))

    async def task(self, task_id: str) -> dict[str, Any]:
        return await self._call("GET", f"/v1/tasks/{task_id}")

    async def cancel(self, task_id: str) -> dict[str, Any]:
        return await self._call("POST", f"/v1/tasks/{task_id}/cancel")

    async def events(
        self, task_id: str, last_event_id: str | None = None, reconnects: int = 20
    ) -> AsyncIterator[StreamEvent]:
        """Every event after ``last_event_id`` (all when None), until ``task.finished``."""
        stream = _Resumable(task_id, last_event_id, reconnects)
        while True:
            try:
                async with self.http.stream("GET", stream.path, **stream.options()) as resp:
                    if not resp.is_success:
                        await resp.aread()
                        _check(resp)
                    parser = SSEParser()
                    async for line in resp.aiter_lines():
                        ev = parser.feed(line)
                        if ev is not None:
                            stream.seen(ev)
                            yield ev
                            if ev.terminal:
                                return
                return  # the server closed the stream: the task is over
            except httpx.TransportError as e:
                await asyncio.sleep(stream.backoff_s(e))

    async def submit_batch(self, body: BatchBody, webhook_url: str | None = None) -> dict[str, Any]:
        return await self._call(
            "POST",
            "/v1/batches",
            content=_batch_content(body),
            headers={"Content-Type": "application/x-ndjson"},
            params={"webhook_url": webhook_url} if webhook_url else None,
        )

    async def batch(self, batch_id: str) -> dict[str, Any]:
        return await self._call("GET", f"/v1/batches/{batch_id}")

    async def cancel_batch(self, batch_id: str) -> dict[str, Any]:
        return await self._call("POST", f"/v1/batches/{batch_id}/cancel")

    async def batch_results(
        self, batch_id: str, trajectory: bool = False
    ) -> AsyncIterator[dict[str, Any]]:
        params = {"include": "trajectory"} if trajectory else {}
        async with self.http.stream(
            "GET", f"/v1/batches/{batch_id}/results", params=params
        ) as resp:
            if not resp.is_success:
                await resp.aread()
                _check(resp)
            async for line in resp.aiter_lines():
                if line:
                    yield json.loads(line)
