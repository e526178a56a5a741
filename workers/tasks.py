"""The Celery tasks: thin. Each one hands its argument to the worker runtime and turns a
``RetryAfter`` into a Celery retry; nothing else happens here.

Retries of ``run_task`` are bounded by the task record's attempt counter (it also counts
attempts whose worker died, which Celery's own counter cannot see), so Celery's
``max_retries`` is unbounded; ``deliver_webhook`` is bounded by ``webhook_max_attempts``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from celery import Celery, Task

from store import keys

if TYPE_CHECKING:
    from workers.worker import WorkerRuntime


def register_tasks(
    app: Celery, runtime: Callable[[], WorkerRuntime], webhook_attempts: int
) -> None:
    @app.task(
        name=keys.RUN_TASK,
        bind=True,
        acks_late=True,
        reject_on_worker_lost=True,
        max_retries=None,
        ignore_result=True,
    )
    def run_task(self: Task, task_id: str, enqueued_ms: int | None = None) -> str:
        from workers.runner import RetryAfter

        outcome = runtime().runner.run(task_id, enqueued_ms)
        if isinstance(outcome, RetryAfter):
            raise self.retry(countdown=outcome.delay_s)
        return outcome.reason

    @app.task(
        name=keys.DELIVER_WEBHOOK,
        bind=True,
        acks_late=True,
        max_retries=webhook_attempts - 1,
        ignore_result=True,
    )
    def deliver_webhook(self: Task, task_id: str) -> None:
        from workers.webhooks import WebhookError, backoff_s

        retries = self.request.retries
        retry_in_s = backoff_s(retries) if retries < webhook_attempts - 1 else None
        try:
            runtime().deliver_webhook(task_id, retry_in_s)
        except WebhookError as e:
            if retry_in_s is None:
                return  # given up (and settled): logged by the runtime
            raise self.retry(exc=e, countdown=retry_in_s) from e
