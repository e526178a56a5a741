"""The Celery tasks: thin. Each one hands its argument to the worker runtime and turns a
``RetryAfter`` into a Celery retry; nothing else happens here.

Retries of ``run_task`` are bounded by the task record's attempt counter (it also counts
attempts whose worker died, which Celery's own counter cannot see), so Celery's
``max_retries`` is unbounded. Webhooks are not Celery tasks: their schedule lives in the
outbox in Redis (``store.webhooks``), sent by each worker's ``WebhookDeliverer``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from celery import Celery, Task

from store import keys

if TYPE_CHECKING:
    from workers.worker import WorkerRuntime


def register_tasks(app: Celery, runtime: Callable[[], WorkerRuntime]) -> None:
    @app.task(
        name=keys.RUN_TASK,
        bind=True,
        acks_late=True,
        reject_on_worker_lost=True,
        max_retries=None,
        ignore_result=True,
    )
    def run_task(self: Task, task_id: str, enqueued_ms: int | None = None) -> str:
        from workers.attempts import RetryAfter

        outcome = runtime().attempts.run(task_id, enqueued_ms)
        if isinstance(outcome, RetryAfter):
            raise self.retry(countdown=outcome.delay_s)
        return outcome.reason
