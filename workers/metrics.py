"""Every Prometheus metric a worker exports, defined once; the names (``actfleet_*``, base
units, low-cardinality labels) are public: dashboards and alerts in ``deploy/`` use them.

Multiprocess-safe: when ``PROMETHEUS_MULTIPROC_DIR`` is set (``actfleet up`` sets it for
the API and the workers it starts) every process writes its samples to files there and
``registry()`` aggregates them, so one ``/metrics`` shows the whole machine and counters
survive a worker that was killed. The variable must be set before this module is first
imported: prometheus-client picks its value store at import time.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    multiprocess,
)

from store import keys

_DURATION_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
_SHORT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

TASKS_FINISHED = Counter(
    "actfleet_tasks_finished_total", "Tasks that reached a terminal status.", ["status"]
)
TASKS_STARTED = Counter("actfleet_tasks_started_total", "Task attempts started by a worker.")
TASKS_RETRIED = Counter(
    "actfleet_tasks_retried_total", "Attempts given back to the queue.", ["reason"]
)
DELIVERIES_DROPPED = Counter(
    "actfleet_deliveries_dropped_total",
    "Task messages dropped at claim (already finished, or a live attempt owns it).",
    ["reason"],
)
TASK_DURATION = Histogram(
    "actfleet_task_duration_seconds",
    "Wall clock from first start to finish.",
    buckets=_DURATION_BUCKETS,
)
TASK_TURNS = Histogram(
    "actfleet_task_turns", "Turns a finished task took.", buckets=(1, 2, 3, 5, 8, 10, 15, 20, 50)
)
LLM_REQUEST = Histogram(
    "actfleet_llm_request_seconds",
    "Model server latency per completion.",
    ["model"],
    buckets=_SHORT_BUCKETS,
)
LLM_TOKENS = Counter("actfleet_llm_tokens_total", "Tokens used.", ["kind"])
# The model-server gate (ACTFLEET_MODEL_MAX_INFLIGHT); ``server`` is the base URL's host:port.
LLM_INFLIGHT = Gauge(
    "actfleet_llm_inflight_requests",
    "Model requests holding a slot of the gate now.",
    ["server"],
    multiprocess_mode="livesum",
)
LLM_WAITING = Gauge(
    "actfleet_llm_waiting_requests",
    "Model requests waiting for a slot of the gate.",
    ["server"],
    multiprocess_mode="livesum",
)
LLM_PERMITS = Gauge(
    "actfleet_llm_permits",
    "Slots of the gate the workers hold (their shares of the limit).",
    ["server"],
    multiprocess_mode="livesum",
)
LLM_LIMIT = Gauge(
    "actfleet_llm_concurrency_limit",
    "The fleet-wide adaptive limit on a model server's in-flight requests.",
    ["server"],
    multiprocess_mode="mostrecent",
)
LLM_OVERLOADS = Counter(
    "actfleet_llm_overloads_total",
    "Overload answers from a model server through the gate: 429, 503 or a timeout.",
    ["server", "signal"],
)
LLM_SLOT_WAIT = Histogram(
    "actfleet_llm_slot_wait_seconds",
    "Time a model request waited for a slot of the gate.",
    ["server"],
    buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
SANDBOX_ACQUIRE = Histogram(
    "actfleet_sandbox_acquire_seconds",
    "Time to get a ready sandbox.",
    ["backend", "pool_hit"],
    buckets=_SHORT_BUCKETS,
)
EXEC = Histogram(
    "actfleet_exec_seconds", "Time per code execution.", ["backend"], buckets=_SHORT_BUCKETS
)
WEBHOOKS = Counter("actfleet_webhook_deliveries_total", "Webhook attempts.", ["outcome"])
QUEUE_DEPTH = Gauge(
    "actfleet_queue_depth", "Messages waiting in the task queue.", multiprocess_mode="mostrecent"
)
TASKS_RUNNING = Gauge(
    "actfleet_tasks_running", "Agent loops running now.", multiprocess_mode="livesum"
)


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def registry() -> CollectorRegistry:
    """The registry to expose: all processes' samples in multiprocess mode, else this one's."""
    if multiprocess_dir():
        reg = CollectorRegistry()
        multiprocess.MultiProcessCollector(reg)
        return reg
    from prometheus_client import REGISTRY

    return REGISTRY


def queue_names(queue: str = keys.TASK_QUEUE) -> list[str]:
    """The Redis lists that hold ``queue``'s messages: kombu's priority sub-queues."""
    sep = "\x06\x16"
    return [queue] + [f"{queue}{sep}{p}" for p in (3, 6, 9)]


def queue_depth(llen: Callable[[str], int]) -> int:
    """Messages waiting in the task queue, over kombu's priority sub-queues."""
    return sum(llen(n) for n in queue_names())


class Running:
    """``with Running():`` counts an agent loop in ``actfleet_tasks_running``."""

    def __enter__(self) -> Running:
        TASKS_RUNNING.inc()
        return self

    def __exit__(self, *exc: object) -> None:
        TASKS_RUNNING.dec()
