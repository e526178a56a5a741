"""The Celery app both sides build, configured for long agent tasks on the Redis broker.

Producer (the API, which only enqueues by name) and consumer (the workers) build it here, so
they agree on queues, routing, serialization and transport options.

Delivery guarantees (the Redis broker is at-least-once), and how they fit together:

* ``task_acks_late`` + ``task_reject_on_worker_lost``: a message is acknowledged only after
  the task returned; a worker that dies leaves it unacknowledged.
* ``worker_prefetch_multiplier = 1``: a worker reserves no more messages than it has
  threads, so nothing waits in a dead worker's memory.
* ``visibility_timeout`` is twice the hard time limit, so kombu never re-delivers a message
  whose task still legitimately runs. Recovery from a dead worker does not wait for it: the
  task's lease expires within ``LEASE_TTL_S`` and a live worker's sweeper re-enqueues it
  (``workers.attempts``). A late re-delivery is then dropped by the claim.
* ``unacked_restore_interval`` / ``unacked_restore_throttle``: check for messages past
  their visibility timeout every 10 s instead of every ~100 s.
* The threads pool runs ``worker_concurrency`` agent loops per process (they wait on the
  model). It cannot enforce Celery's time limits; they are set for other pools, and the
  loop enforces ``limits.timeout_s`` itself.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Sequence
from typing import Any

import orjson
from celery import Celery

from store import broker, keys

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_TIME_LIMIT_S = 4 * 3600.0


def celery_config(
    redis_url: str | None,
    *,
    concurrency: int = 1,
    time_limit_s: float = DEFAULT_TIME_LIMIT_S,
) -> dict[str, Any]:
    hard = time_limit_s
    return {
        "broker_url": redis_url or DEFAULT_REDIS_URL,
        "broker_transport": broker.TRANSPORT,  # kombu's Redis transport, one client per channel
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,  # reconnect forever after a Redis restart
        "broker_transport_options": {
            "visibility_timeout": int(2 * hard),
            "unacked_restore_interval": 10,
            "unacked_restore_throttle": 1,
            "socket_timeout": 30,
            "socket_connect_timeout": 5,
            "health_check_interval": 15,
            "retry_on_timeout": True,
        },
        "result_backend": None,  # results live in the task record, not in Celery
        "task_ignore_result": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_default_queue": keys.TASK_QUEUE,
        "task_routes": {
            keys.RUN_TASK: {"queue": keys.TASK_QUEUE},
        },
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        "task_time_limit": hard,
        "task_soft_time_limit": hard - 60,
        "worker_prefetch_multiplier": 1,
        "worker_pool": "threads",
        "worker_concurrency": concurrency,
        "worker_hijack_root_logger": False,  # structlog owns logging
        "worker_redirect_stdouts": False,
        "worker_send_task_events": False,
        "worker_enable_remote_control": False,  # no pidbox queues in Redis
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "worker_soft_shutdown_timeout": 5.0,
    }


def make_celery(
    redis_url: str | None,
    *,
    concurrency: int = 1,
    time_limit_s: float = DEFAULT_TIME_LIMIT_S,
) -> Celery:
    """An app that can enqueue by name; the worker adds its tasks (``workers.celery_tasks``)."""
    app = Celery("actfleet", set_as_current=False)
    app.conf.update(celery_config(redis_url, concurrency=concurrency, time_limit_s=time_limit_s))
    return app


def enqueue(app: Celery, task_id: str, enqueued_ms: int, batch_id: str | None = None) -> None:
    """Push a ``run_task`` message for ``task_id``; ``enqueued_ms`` (unix ms) is the push
    time recorded in the queued index (``store.keys``), carried so that the worker that
    takes the message can tell how far the FIFO queue has moved. ``batch_id``: the task's
    batch, which spares the claim a round trip (``WorkerStore.claim``)."""
    kwargs: dict[str, Any] = {"enqueued_ms": enqueued_ms}
    if batch_id:
        kwargs["batch_id"] = batch_id
    app.send_task(keys.RUN_TASK, args=[task_id], kwargs=kwargs, queue=keys.TASK_QUEUE)


# -- bulk enqueue ---------------------------------------------------------------------------
#
# The API writes ``run_task`` messages itself instead of calling ``send_task``, which does
# routing, signals and kombu's publish path (and a new redis client) for every message: a
# large batch must not hold the API's CPU while the workers already start its first tasks
# (docs/performance.md has the cost of each). A ``run_task`` message is tiny and its format
# is Celery's documented task message protocol (version 2) inside kombu's Redis envelope, so
# a batch's messages go out in a few LPUSHes. That format is a contract with the pinned
# Celery and kombu (pyproject.toml): tests/integration/test_queue.py checks it field for
# field against ``send_task`` and decodes it with a kombu consumer; the end-to-end tests run
# real workers on it.

BULK_CHUNK = 1000  # messages per LPUSH

# The headers and properties Celery's worker and kombu's Redis channel read, and no more:
# a queued task's message is a third of its memory in Redis, so the optional ones
# ``send_task`` also writes (argsrepr, kwargsrepr, origin, eta, expires, shadow, stamps,
# ...: each read with a default) are left out, and the JSON is compact.
# tests/integration/test_queue.py checks that every field present says what ``send_task``
# says, and decodes the messages with a kombu consumer; the end-to-end tests run real
# workers on them.
_MESSAGE = (
    '{{"body":"{body}","content-encoding":"utf-8","content-type":"application/json",'
    '"headers":{{"lang":"py","task":"{task}","id":"{id}","root_id":"{id}","parent_id":null,'
    '"group":null,"retries":0,"timelimit":[null,null]}},'
    '"properties":{{"correlation_id":"{id}","delivery_mode":2,'
    '"delivery_info":{{"exchange":"","routing_key":"{queue}"}},"priority":0,'
    '"body_encoding":"base64","delivery_tag":"{tag}"}}}}'
)


def run_task_message(task_id: str, enqueued_ms: int, batch_id: str | None = None) -> str:
    """The broker message that ``enqueue(app, task_id, enqueued_ms, batch_id)`` would push,
    with only the fields a worker reads."""
    return RunTaskMessages(enqueued_ms, batch_id).messages([task_id])[0]


class RunTaskMessages:
    """``run_task_message`` for many tasks of one submission (one push time, one batch):
    the message is ``_MESSAGE`` cut once into its constant parts, and only each task's id,
    body and two uuids go between them. For 100,000 messages: 1.3 µs each instead of 7
    (``str.format`` and two ``uuid.uuid4()``; the uuids come from one ``os.urandom`` call
    per chunk, 0.6 µs for two instead of 2.3)."""

    def __init__(self, enqueued_ms: int, batch_id: str | None = None) -> None:
        kwargs: dict[str, Any] = {"enqueued_ms": enqueued_ms}
        if batch_id:
            kwargs["batch_id"] = batch_id
        self._body_tail = b"]," + orjson.dumps(kwargs) + b",{}]"
        # the parts between the variable fields, in order: body, id, id, id, tag
        cut = _MESSAGE.format(
            body=_CUT, task=keys.RUN_TASK, id=_CUT, queue=keys.TASK_QUEUE, tag=_CUT
        )
        self._parts = cut.split(_CUT)

    def messages(self, task_ids: Sequence[str]) -> list[str]:
        p0, p1, p2, p3, p4, p5 = self._parts
        tail = self._body_tail
        dumps, b64 = orjson.dumps, base64.b64encode
        out = []
        for task_id, (message_id, tag) in zip(task_ids, _uuid4_pairs(len(task_ids)), strict=True):
            body = b64(b"[[" + dumps(task_id) + tail).decode()
            out.append(f"{p0}{body}{p1}{message_id}{p2}{message_id}{p3}{message_id}{p4}{tag}{p5}")
        return out


_CUT = "\0"  # where a variable field goes (no message holds a NUL)
_VARIANT = "89ab" * 4  # a random nibble's RFC 4122 variant digit


def _uuid4_pairs(n: int) -> list[tuple[str, str]]:
    """``n`` pairs of random (version 4) UUIDs as ``str(uuid.uuid4())`` writes them."""
    h = os.urandom(32 * n).hex()
    ids = [
        f"{h[i : i + 8]}-{h[i + 8 : i + 12]}-4{h[i + 13 : i + 16]}-"
        f"{_VARIANT[int(h[i + 16], 16)]}{h[i + 17 : i + 20]}-{h[i + 20 : i + 32]}"
        for i in range(0, 64 * n, 32)
    ]
    return list(zip(ids[::2], ids[1::2], strict=True))


def run_task_pushes(
    task_ids: Sequence[str], enqueued_ms: int, batch_id: str | None = None
) -> list[tuple[str, list[str]]]:
    """``(queue, messages)`` LPUSH arguments that enqueue ``task_ids`` (of ``batch_id``, if
    given) in order.

    kombu's Redis consumers pop from the list's tail, and LPUSH pushes its arguments onto
    the head one by one, so the first id given is the first one a worker takes."""
    messages = RunTaskMessages(enqueued_ms, batch_id).messages(task_ids)
    return [
        (keys.TASK_QUEUE, messages[start : start + BULK_CHUNK])
        for start in range(0, len(messages), BULK_CHUNK)
    ]
