"""store.broker against a real redis-server: the contract with kombu's private hooks.

The transport overrides kombu's ``Channel._create_client`` (one client per channel) and the
Redis ``QoS.ack``/``reject`` (a slot is freed even when Redis is down). Neither is kombu's
public API, so kombu is pinned (pyproject.toml) and these tests fail if a kombu release stops
calling the hooks or changes what they must do.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import redis

from store import broker, keys
from store.celery_app import make_celery
from tests.conftest import RedisServer


@contextmanager
def consuming(url: str, names: list[str]) -> Iterator[Any]:
    """A kombu queue on the Celery app's own broker connection, holding ``names`` as
    ``run_task`` messages."""
    app = make_celery(url)
    for name in names:
        app.send_task(keys.RUN_TASK, args=[name], queue=keys.TASK_QUEUE)
    try:
        with app.connection_for_read() as conn, conn.SimpleQueue(keys.TASK_QUEUE) as queue:
            assert isinstance(queue.channel, broker.Channel)
            yield queue
    finally:
        app.close()


def test_kombu_sends_its_commands_through_the_channels_one_client(redis_url: str) -> None:
    # Given a channel of the app's transport: declaring the queue already went through our
    # hook (only broker.Channel._create_client sets _sync_client)
    with consuming(redis_url, ["task_a", "task_b"]) as queue:
        channel = queue.channel
        client = channel._sync_client
        assert client is not None
        # When kombu takes and acknowledges messages (unacked bookkeeping, acks)
        for _ in range(2):
            queue.get(timeout=5).ack()
        # Then every command since went through that one client
        assert channel._sync_client is client
        assert client.connection_pool is channel.pool
        assert redis.Redis.from_url(redis_url).hlen("unacked") == 0
        # and the asynchronous client (the polling connection) is still kombu's own
        assert channel._create_client(asynchronous=True) is not client


@pytest.mark.parametrize("settle", ["ack", "reject"])
def test_a_settle_that_cannot_reach_redis_still_frees_its_prefetch_slot(
    redis_server: RedisServer, settle: str
) -> None:
    # Given a consumer with a prefetch window of one, holding one message
    with consuming(redis_server.url, ["task_a"]) as queue:
        channel = queue.channel
        channel.qos.prefetch_count = 1
        message = queue.get(timeout=5)
        assert not channel.qos.can_consume()
        # When Redis dies and the message is acknowledged (or rejected)
        redis_server.kill()
        with pytest.raises(channel.connection_errors):
            getattr(message, settle)()
        # Then the error reaches the caller, but the slot is free again: without it the
        # channel would never consume another message
        assert channel.qos.can_consume()


def test_kombus_stock_qos_keeps_the_slot_when_redis_is_down(redis_server: RedisServer) -> None:
    """The reason for the override: if this starts failing, kombu frees the slot itself and
    ``broker.QoS`` may go."""
    from kombu.transport import redis as kombu_redis

    with consuming(redis_server.url, ["task_a"]) as queue:
        channel = queue.channel
        channel.qos.prefetch_count = 1
        message = queue.get(timeout=5)
        redis_server.kill()
        with pytest.raises(channel.connection_errors):
            kombu_redis.QoS.ack(channel.qos, message.delivery_tag)
        assert not channel.qos.can_consume()
