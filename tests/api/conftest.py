"""The real API over real HTTP: uvicorn in a thread on a free port, a real redis-server.

No worker runs here: tests play the worker's role through the same Lua scripts (take a
lease, STEP events, FINISH), which is exactly what a worker does to the store.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import redis
import uvicorn

from agent.events import Event, EventType
from agent.models import FailureClass, Result, Status, Usage
from api.app import create_app
from config.settings import Settings
from store.apikeys import create_key
from store.intake import MATERIALIZE
from store.keys import STREAM_MAXLEN, Keys
from store.scripts import FINISH, STEP, finish_call

DEFAULT_USAGE = Usage(100, 20, 1)


class ApiServer:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(create_app(settings), log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def start(self) -> ApiServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the API did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


@dataclass
class Fleet:
    """The API under test plus direct access to its Redis, for playing the worker."""

    api: ApiServer
    redis: redis.Redis
    keys: Keys

    @property
    def url(self) -> str:
        return self.api.url

    def key_for(self, tenant: str) -> str:
        key, _ = create_key(self.redis, self.keys, tenant)
        return key

    def client(self, tenant: str | None = "acme", **kw: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.key_for(tenant)}"} if tenant else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30, **kw)

    def active(self, tenant: str) -> int:
        """The tenant's unfinished tasks: slots reserved less tasks finished (per shard)."""
        k = self.keys
        finished = sum(int(self.redis.get(k.tenant_finished(tenant, s)) or 0) for s in k.shard_ids)
        return int(self.redis.get(k.tenant_active(tenant)) or 0) - finished

    # -- the worker's role ------------------------------------------------------------

    def start_task(self, task_id: str, owner: str = "w1/1") -> str:
        status, batch_id = self.redis.hmget(self.keys.task(task_id), ["status", "batch_id"])
        if batch_id and status == b"queued":  # as CLAIM does
            counts = self.keys.batch_counts(batch_id.decode(), self.keys.shard(task_id))
            self.redis.hincrby(counts, "queued", -1)
            self.redis.hincrby(counts, "running", 1)
        self.redis.eval(MATERIALIZE, 2, self.keys.task(task_id), self.keys.events(task_id))
        self.redis.set(self.keys.lease(task_id), owner)
        self.redis.hset(
            self.keys.task(task_id), mapping={"status": "running", "attempt": owner.split("/")[1]}
        )
        self.append(task_id, EventType.STARTED, owner=owner)
        return owner

    def append(
        self, task_id: str, etype: EventType, turn: int = 0, owner: str = "w1/1", **data: Any
    ) -> str:
        event = Event(etype, turn=turn, attempt=int(owner.split("/")[1]), ts=time.time(), data=data)
        seq = int(self.redis.hget(self.keys.task(task_id), "seq") or 0) + 1
        out = self.redis.eval(
            STEP,
            3,
            self.keys.task(task_id),
            self.keys.lease(task_id),
            self.keys.events(task_id),
            owner,
            event.to_json(),
            STREAM_MAXLEN,
            "",
            seq,
        )
        assert isinstance(out, bytes), f"not appended: {out!r}"
        return out.decode()

    def finish(
        self,
        task_id: str,
        status: Status = Status.COMPLETED,
        owner: str = "w1/1",
        answer: str | None = "42",
        correct: bool | None = None,
        turns: int = 1,
        usage: Usage = DEFAULT_USAGE,
        messages: tuple[dict[str, str], ...] = (),
        failure_class: FailureClass | None = None,
    ) -> Any:
        rec = self.redis.hgetall(self.keys.task(task_id))
        result = Result(
            status=status,
            failure_class=failure_class,
            answer=answer,
            correct=correct,
            turns=turns,
            usage=usage,
            messages=messages,
        )
        event = Event(
            EventType.FINISHED, turn=turns, attempt=1, ts=time.time(), data={"status": status.value}
        )
        tenant = rec[b"tenant"].decode()
        batch_id = rec[b"batch_id"].decode() if rec.get(b"batch_id") else None
        keys, args = finish_call(
            self.keys,
            task_id,
            tenant,
            batch_id,
            owner=owner,
            result=result,
            event=event,
            finished_at=time.time(),
        )
        return self.redis.eval(FINISH, len(keys), *keys, *args)


def fleet_settings(redis_url: str, **overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "redis_url": redis_url,
        "key_prefix": "t",
        "sse_heartbeat_s": 0.5,
    }
    return Settings(**{**base, **overrides})


@pytest.fixture
def make_fleet(redis_url: str) -> Iterator[Any]:
    started: list[Fleet] = []

    def make(**overrides: Any) -> Fleet:
        settings = fleet_settings(redis_url, **overrides)
        fleet = Fleet(ApiServer(settings).start(), redis.Redis.from_url(redis_url), Keys("t"))
        started.append(fleet)
        return fleet

    yield make
    for f in started:
        f.api.stop()
        f.redis.close()


@pytest.fixture
def fleet(make_fleet: Any) -> Fleet:
    return make_fleet()  # type: ignore[no-any-return]


def spec(prompt: str = "What is 6*7?", **kw: Any) -> dict[str, Any]:
    return {"prompt": prompt, **kw}
