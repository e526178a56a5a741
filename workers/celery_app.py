"""The worker's Celery app: ``store.celery_app``'s app, sized from the worker's settings."""

from __future__ import annotations

from celery import Celery

from config.settings import Settings
from store.celery_app import DEFAULT_REDIS_URL, enqueue
from store.celery_app import make_celery as make_queue_app

__all__ = ["DEFAULT_REDIS_URL", "enqueue", "make_celery"]


def make_celery(settings: Settings) -> Celery:
    return make_queue_app(
        settings.redis_url,
        concurrency=settings.worker_concurrency,
        time_limit_s=settings.task_time_limit_s,
    )
