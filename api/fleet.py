"""Enqueue task ids on the Celery broker without importing worker code paths, and read
the broker's and the workers' state for readiness.

The broker is the API's own Redis, so a batch's ``run_task`` messages (built by
``store.celery_app.run_task_message``) go out in a few LPUSHes on the API's async client: a
2,000-task batch is queued in tens of milliseconds instead of seconds of ``send_task``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from agent.errors import InfrastructureError
from store.celery_app import run_task_pushes
from store.keys import TASK_QUEUE, WORKER_TTL_S, Keys


class EnqueueError(InfrastructureError):
    """The broker did not accept a message."""


class Enqueuer:
    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client

    async def enqueue(self, task_ids: Sequence[str], enqueued_ms: int) -> None:
        """Queue ``task_ids`` in order, all or none (one MULTI/EXEC for every chunk);
        ``enqueued_ms`` is their score in the queued index (``ApiStore.write_tasks``)."""
        if not task_ids:
            return
        pipe = self.client.pipeline(transaction=True)
        for queue, messages in run_task_pushes(task_ids, enqueued_ms):
            pipe.lpush(queue, *messages)
        try:
            await pipe.execute()
        except RedisError as e:
            raise EnqueueError(f"the broker refused the task messages: {e!r}") from e


async def fleet_health(client: aioredis.Redis, keys: Keys) -> dict[str, Any]:
    """The task queue's depth (reading it proves the broker list is reachable) and the
    workers that sent a heartbeat within ``WORKER_TTL_S``, with those whose status says
    their broker consumer is dead. Raises Redis errors."""
    now = time.time()
    pipe = client.pipeline(transaction=False)
    pipe.ping()
    pipe.llen(TASK_QUEUE)
    pipe.zremrangebyscore(keys.workers, "-inf", now - WORKER_TTL_S)
    pipe.zrange(keys.workers, 0, -1)
    _, depth, _, workers = await pipe.execute()
    raw = await client.mget([keys.worker(_s(w)) for w in workers]) if workers else []
    alive = {_s(w): json.loads(v) for w, v in zip(workers, raw, strict=True) if v}
    stalled = sorted(w for w, status in alive.items() if status.get("consumer") == "stalled")
    return {
        "queue": {"name": TASK_QUEUE, "depth": int(depth)},
        "workers": {"alive": len(alive), "consumer_stalled": stalled},
    }


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)
