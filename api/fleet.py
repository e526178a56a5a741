"""The API's side of the fleet: enqueue task ids on the Celery broker without importing
worker code paths, and read the broker's and the workers' state for readiness.

The broker is the API's own Redis, so a batch's ``run_task`` messages (built by
``store.celery_app.run_task_message``) go out in a few LPUSHes on the API's async client,
all or none, without blocking the event loop on Celery's synchronous publish path.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from agent.errors import InfrastructureError
from agent.text import text_of
from store.celery_app import run_task_pushes
from store.keys import TASK_QUEUE, WORKER_TTL_S, Keys


class EnqueueError(InfrastructureError):
    """The broker did not accept a message."""


class Enqueuer:
    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client

    async def enqueue(
        self, task_ids: Sequence[str], enqueued_ms: int, batch_id: str | None = None
    ) -> None:
        """Queue ``task_ids`` (of ``batch_id``, if given) in order, all or none (one
        MULTI/EXEC for every chunk); ``enqueued_ms`` is their score in the queued index
        (``store.intake``)."""
        if not task_ids:
            return
        pipe = self.client.pipeline(transaction=True)
        for queue, messages in run_task_pushes(task_ids, enqueued_ms, batch_id):
            pipe.lpush(queue, *messages)
        try:
            await pipe.execute()
        except RedisError as e:
            raise EnqueueError(f"the broker refused the task messages: {e!r}") from e


async def fleet_health(
    client: aioredis.Redis, keys: Keys, broker: aioredis.Redis | None = None
) -> dict[str, Any]:
    """The task queue's depth on ``broker`` (default: ``client``; reading it proves the
    broker list is reachable) and the workers that sent a heartbeat within
    ``WORKER_TTL_S``, with those whose status says their broker consumer is dead. Raises
    Redis errors."""
    now = time.time()
    depth = await (broker or client).llen(TASK_QUEUE)
    await client.ping()  # on its own: a cluster's pipeline takes keyed commands only
    pipe = client.pipeline(transaction=False)
    pipe.zremrangebyscore(keys.workers, "-inf", now - WORKER_TTL_S)
    pipe.zrange(keys.workers, 0, -1)
    _, workers = await pipe.execute()
    pipe = client.pipeline(transaction=False)  # not MGET: the keys may be on many nodes
    for w in workers:
        pipe.get(keys.worker(text_of(w)))
    raw = await pipe.execute() if workers else []
    alive = {text_of(w): json.loads(v) for w, v in zip(workers, raw, strict=True) if v}
    stalled = sorted(w for w, status in alive.items() if status.get("consumer") == "stalled")
    return {
        "queue": {"name": TASK_QUEUE, "depth": int(depth)},
        "workers": {"alive": len(alive), "consumer_stalled": stalled},
    }
