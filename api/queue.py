"""Enqueue task ids on the Celery broker, by task name, without importing worker code paths.

Celery's ``send_task`` is blocking I/O, so ``Enqueuer.enqueue`` runs it in worker threads,
each sending its share of a batch through one pooled producer (about 1 s per 2,000
messages on a 2-core machine: one LPUSH round trip each).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import anyio.to_thread
from celery import Celery

import store.queue
from actfleet.settings import Settings
from agent.errors import InfrastructureError
from store.keys import RUN_TASK, TASK_QUEUE

PARALLEL_SENDERS = 4
PARALLEL_MIN_CHUNK = 100


class EnqueueError(InfrastructureError):
    """The broker did not accept a message."""


def make_celery(settings: Settings) -> Celery:
    """A producer with the workers' broker options and routing (``store.queue``)."""
    return store.queue.make_celery(settings.redis_url, time_limit_s=settings.task_time_limit_s)


class Enqueuer:
    def __init__(self, app: Celery) -> None:
        self.app = app

    def enqueue_sync(self, task_ids: Sequence[str]) -> None:
        try:
            with self.app.producer_or_acquire() as producer:
                for task_id in task_ids:
                    self.app.send_task(
                        RUN_TASK, args=[task_id], queue=TASK_QUEUE, producer=producer
                    )
        except Exception as e:  # kombu/redis errors vary by transport: translate them all
            raise EnqueueError(f"the broker refused the task messages: {e!r}") from e

    async def enqueue(self, task_ids: Sequence[str]) -> None:
        """Send in parallel chunks: each message is one broker round trip, so a few
        connections at once cut a large batch's wall time."""
        ids = list(task_ids)
        if not ids:
            return
        size = max(PARALLEL_MIN_CHUNK, -(-len(ids) // PARALLEL_SENDERS))
        await asyncio.gather(
            *(
                anyio.to_thread.run_sync(self.enqueue_sync, ids[start : start + size])
                for start in range(0, len(ids), size)
            )
        )

    def close(self) -> None:
        self.app.close()
