"""Enqueue task ids on the Celery broker without importing worker code paths.

The broker is the API's own Redis, so a batch's ``run_task`` messages (built by
``store.queue.run_task_message``) go out in a few LPUSHes on the API's async client: a
2,000-task batch is queued in tens of milliseconds instead of seconds of ``send_task``.
"""

from __future__ import annotations

from collections.abc import Sequence

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from agent.errors import InfrastructureError
from store.queue import run_task_pushes


class EnqueueError(InfrastructureError):
    """The broker did not accept a message."""


class Enqueuer:
    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client

    async def enqueue(self, task_ids: Sequence[str], enqueued_ms: int) -> None:
        """Queue ``task_ids`` in order, all or none (one MULTI/EXEC for every chunk);
        ``enqueued_ms`` is their score in the queued index (``AsyncStore.write_tasks``)."""
        if not task_ids:
            return
        pipe = self.client.pipeline(transaction=True)
        for queue, messages in run_task_pushes(task_ids, enqueued_ms):
            pipe.lpush(queue, *messages)
        try:
            await pipe.execute()
        except RedisError as e:
            raise EnqueueError(f"the broker refused the task messages: {e!r}") from e
