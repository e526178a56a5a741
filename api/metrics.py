"""The API's Prometheus metrics and the ``/metrics`` exposition.

Three sources, one page:

* this process's metrics (requests by route template and status, tasks submitted);
* with ``PROMETHEUS_MULTIPROC_DIR`` set, every process writing to that directory (API
  workers and Celery workers on this machine), through the multiprocess collector;
* fleet-wide numbers read from Redis at scrape time, true whichever machine the workers run
  on: ``actfleet_fleet_tasks_finished_total{status}`` (the counts FINISH keeps in each
  shard's ``{p}:{s}:stats:finished``, summed), ``actfleet_fleet_tasks_running`` and
  ``actfleet_fleet_queue_depth``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from agent.models import TERMINAL_STATUSES
from agent.text import text_of
from store.keys import TASK_QUEUE, Keys


class ApiMetrics:
    """The metrics of one app, registered on their own registry (no global state)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "actfleet_http_requests_total",
            "HTTP requests answered, by route template and status code.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "actfleet_http_request_duration_seconds",
            "Time to answer an HTTP request (streams: until the stream ends).",
            ["method", "route"],
            registry=self.registry,
        )
        self.tasks_submitted = Counter(
            "actfleet_tasks_submitted_total",
            "Tasks accepted and queued (single and batch).",
            registry=self.registry,
        )

    def exposition_registry(self) -> CollectorRegistry:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            MultiProcessCollector(registry)  # includes this process's own files
            return registry
        return self.registry


class _Fleet:
    def __init__(self, finished: dict[str, int], running: int, queued: int) -> None:
        self.finished, self.running, self.queued = finished, running, queued

    def collect(self) -> Iterable[Metric]:
        if self.finished:  # absent until FINISH has counted a task: never a false zero
            c = CounterMetricFamily(
                "actfleet_fleet_tasks_finished",
                "Tasks that reached a terminal status, fleet-wide (from Redis).",
                labels=["status"],
            )
            for status in TERMINAL_STATUSES:
                c.add_metric([status.value], self.finished.get(status.value, 0))
            yield c
        yield GaugeMetricFamily(
            "actfleet_fleet_tasks_running", "Tasks holding a worker lease now.", value=self.running
        )
        yield GaugeMetricFamily(
            "actfleet_fleet_queue_depth", "Messages waiting on the task queue.", value=self.queued
        )


async def render(metrics: ApiMetrics, client: Any, keys: Keys, broker: Any = None) -> bytes:
    """The ``/metrics`` page: process metrics, then fleet-wide numbers from Redis (the
    queue's depth from ``broker``, default ``client``)."""
    page = generate_latest(metrics.exposition_registry())
    try:
        queued = await (broker or client).llen(TASK_QUEUE)
        pipe = client.pipeline(transaction=False)
        for shard in keys.shard_ids:
            pipe.hgetall(keys.finished_counts(shard))
            pipe.zcard(keys.running(shard))
        per_shard = await pipe.execute()
    except Exception:  # Redis down: still serve the process metrics (readyz reports it)
        return page
    finished: dict[str, int] = {}
    for counts in per_shard[::2]:
        for k, v in counts.items():
            finished[text_of(k)] = finished.get(text_of(k), 0) + int(v)
    running = sum(int(n) for n in per_shard[1::2])
    fleet = CollectorRegistry()
    fleet.register(_Fleet(finished, running, int(queued)))
    return page + generate_latest(fleet)


class MetricsMiddleware:
    """Counts and times every request by its route *template* (never a task id)."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            self.metrics.requests.labels(method, template, str(status)).inc()
            self.metrics.latency.labels(method, template).observe(time.perf_counter() - start)
