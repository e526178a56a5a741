"""The API's bulk enqueue writes the same broker messages Celery's ``send_task`` writes."""

from __future__ import annotations

import asyncio
import base64
import json

import pytest
import redis
import redis.asyncio as aioredis
from kombu import Connection

from api.fleet import EnqueueError, Enqueuer
from store import broker, keys
from store.celery_app import enqueue, make_celery, run_task_message

# What differs from one message to the next, or names the sending process.
_PER_MESSAGE = {"id", "root_id", "correlation_id", "delivery_tag", "origin", "reply_to"}


def _shape(message: dict) -> dict:
    """The message without its per-message ids, nested dicts flattened for comparison."""
    return {
        "top": {k: v for k, v in message.items() if k not in ("headers", "properties", "body")},
        "headers": {k: v for k, v in message["headers"].items() if k not in _PER_MESSAGE},
        "properties": {k: v for k, v in message["properties"].items() if k not in _PER_MESSAGE},
    }


@pytest.mark.parametrize("batch_id", [None, "batch_b"])
def test_bulk_message_says_what_send_task_writes_in_fewer_fields(
    redis_url: str, batch_id: str | None
) -> None:
    # given the message Celery itself writes for run_task("task_a", enqueued_ms=...)
    app = make_celery(redis_url)
    enqueue(app, "task_a", 1712345678901, batch_id)
    r = redis.Redis.from_url(redis_url)
    celery_message = json.loads(r.rpop(keys.TASK_QUEUE))  # type: ignore[arg-type]
    app.close()
    # when the bulk path builds one for the same task
    raw = run_task_message("task_a", 1712345678901, batch_id)
    ours = json.loads(raw)
    # then every field it has says what Celery's says, but for the per-message ids
    theirs = _shape(celery_message)
    mine = _shape(ours)
    assert mine["top"].keys() == theirs["top"].keys() - {"body"}
    for part in ("headers", "properties"):
        assert mine[part].items() <= theirs[part].items(), part
    # and it has the fields a worker reads: the task, its ids, the delivery envelope
    assert {"task", "id", "root_id"} <= ours["headers"].keys()
    assert {"delivery_tag", "delivery_info", "body_encoding"} <= ours["properties"].keys()
    args, kwargs, _embed = json.loads(base64.b64decode(ours["body"]))
    assert [args, kwargs] == json.loads(base64.b64decode(celery_message["body"]))[:2]
    expected = {"enqueued_ms": 1712345678901} | ({"batch_id": batch_id} if batch_id else {})
    assert kwargs == expected
    # and it is smaller than Celery's by the optional fields it leaves out
    assert len(raw) < 0.7 * len(json.dumps(celery_message))
    # and each message carries its own ids
    again = json.loads(run_task_message("task_a", 1712345678901))
    assert again["headers"]["id"] != ours["headers"]["id"]
    assert again["properties"]["delivery_tag"] != ours["properties"]["delivery_tag"]


def test_a_kombu_consumer_gets_every_task_once_in_submission_order(redis_url: str) -> None:
    # given 2,500 task ids (more than one LPUSH chunk) enqueued in bulk
    ids = [f"task_{i:05d}" for i in range(2500)]

    async def enqueue() -> None:
        client = aioredis.Redis.from_url(redis_url, decode_responses=True)
        await Enqueuer(client).enqueue(ids, 1712345678901)
        await client.aclose()

    asyncio.run(enqueue())
    # when a kombu consumer on the Redis transport drains the queue
    got = []
    with Connection(redis_url) as conn, conn.SimpleQueue(keys.TASK_QUEUE) as queue:
        for _ in ids:
            message = queue.get(timeout=5)
            assert message.headers["task"] == keys.RUN_TASK
            args, kwargs, _embed = message.payload
            assert kwargs == {"enqueued_ms": 1712345678901}
            got.append(args[0])
            message.ack()
    # then it decoded every message, in the order given
    assert got == ids


def test_an_unreachable_broker_is_an_enqueue_error() -> None:
    async def enqueue() -> None:
        client = aioredis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=1)
        try:
            await Enqueuer(client).enqueue(["task_x"], 1712345678901)
        finally:
            await client.aclose()

    with pytest.raises(EnqueueError, match="the broker refused the task messages"):
        asyncio.run(enqueue())


def test_the_apps_transport_shares_one_client_per_channel_and_still_tracks_unacked(
    redis_url: str,
) -> None:
    # given the Celery app's broker connection, and three tasks on the queue
    app = make_celery(redis_url)
    for name in ("task_a", "task_b", "task_c"):
        app.send_task(keys.RUN_TASK, args=[name], queue=keys.TASK_QUEUE)
    r = redis.Redis.from_url(redis_url)
    with app.connection_for_read() as conn, conn.SimpleQueue(keys.TASK_QUEUE) as queue:
        channel = queue.channel
        assert isinstance(channel, broker.Channel)
        # when a consumer takes them, acknowledging all but the last
        got = []
        for _ in range(3):
            message = queue.get(timeout=5)
            got.append(message.payload[0][0])
            if len(got) < 3:
                message.ack()
        # then every command went through one client, and kombu's unacked bookkeeping
        # (written and cleared through it) holds exactly the message not acknowledged
        assert got == ["task_a", "task_b", "task_c"]
        client = channel._create_client()
        assert channel._create_client() is client
        assert r.hlen("unacked") == 1
        assert r.zcard("unacked_index") == 1
        message.ack()
        assert r.hlen("unacked") == 0
        # and a channel whose pool was dropped (a fork, a lost connection) builds a new one
        channel._disconnect_pools()
        fresh = channel._create_client()
        assert fresh is not client
        assert fresh.connection_pool is channel.pool
        assert fresh.ping()
    app.close()
