"""The Celery tasks: thin. Each one hands its arguments to the worker's attempt runner and
turns a ``RetryAfter`` into a Celery retry; nothing else happens here.

Retries of ``run_task`` are bounded by the task record's attempt counter (it also counts
attempts whose worker died, which Celery's own counter cannot see), so Celery's
``max_retries`` is unbounded. Webhooks are not Celery tasks: their schedule lives in the
outbox in Redis (``store.webhooks``), sent by each worker's ``WebhookDeliverer``.
"""

from __future__ import annotations

from collections.abc import Callable

from celery import Celery, Task

from store import keys
from workers.attempts import Done, RetryAfter

# (task id, enqueued_ms, batch id the message names) -> outcome
Attempt = Callable[[str, int | None, str | None], Done | RetryAfter]


def register_tasks(app: Celery, attempt: Attempt) -> None:
    """Register ``run_task`` on ``app``; each delivery runs
    ``attempt(task_id, enqueued_ms, batch_id)``."""

    @app.task(
        name=keys.RUN_TASK,
        bind=True,
        acks_late=True,
        reject_on_worker_lost=True,
        max_retries=None,
        ignore_result=True,
    )
    def run_task(
        self: Task, task_id: str, enqueued_ms: int | None = None, batch_id: str | None = None
    ) -> str:
        outcome = attempt(task_id, enqueued_ms, batch_id)
        if isinstance(outcome, RetryAfter):
            raise self.retry(countdown=outcome.delay_s)
        return outcome.reason
