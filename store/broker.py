"""kombu's Redis transport, with one synchronous client per channel instead of one per call,
and acknowledgements that free their prefetch slot even when Redis is down.

kombu's Redis channel builds a new ``redis.Redis`` for every command it sends outside its
polling connection (``conn_or_acquire`` -> ``_create_client``): each delivery's unacked
bookkeeping, each ack, each publish. The connections come from the channel's pool either
way, but building a client is not free (redis-py copies its table of response callbacks into
a new dict each time), and in a worker that cost lands on the consumer thread, the one that
hands out every task (docs/performance.md). ``_create_client`` is kombu's private method:
the kombu range in pyproject.toml is pinned for it, and tests/integration/test_broker.py
checks that kombu still calls it and that the channel keeps one client.

A ``redis.Redis`` over a connection pool is safe to share between threads (each command
takes a connection from the pool), so the channel keeps one, and builds a new one only when
its pool was replaced (after a fork or a lost connection, kombu drops the pool).
An acknowledgement (or a reject) that cannot reach Redis must still free its slot in the
channel's prefetch window. kombu's ``QoS.ack`` removes the message from Redis' unacked
index first and forgets the delivery locally only if that worked. A task that ends while
Redis is down (the store gives up after its patience) therefore stays counted as
delivered, and once every slot is held that way ``can_consume()`` is false forever: the
channel never sends another BRPOP, so it never even notices the dead connection, and the
worker stops consuming while its heartbeat goes on. Here the delivery is forgotten
locally whatever happens to the Redis write. The message stays in the unacked index and
comes back after the visibility timeout, and the claim then drops it (the task finished,
or a sweeper already handed it to another attempt).

Celery uses this transport through ``broker_transport`` (``store.celery_app.celery_config``);
the URL still says where Redis is.
"""

from __future__ import annotations

from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.transport import virtual


class QoS(kombu_redis.QoS):
    def ack(self, delivery_tag: Any) -> None:
        try:
            super().ack(delivery_tag)
        except self.channel.connection_errors:
            virtual.QoS.ack(self, delivery_tag)  # free the slot; Redis restores it later
            raise

    def reject(self, delivery_tag: Any, requeue: bool = False) -> None:
        try:
            super().reject(delivery_tag, requeue=requeue)
        except self.channel.connection_errors:
            virtual.QoS.ack(self, delivery_tag)
            raise


class Channel(kombu_redis.Channel):
    QoS = QoS
    _sync_client: Any = None

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:
            return super()._create_client(asynchronous=True)
        pool = self.pool
        client = self._sync_client
        if client is None or client.connection_pool is not pool:
            client = self._sync_client = super()._create_client()
        return client


class Transport(kombu_redis.Transport):
    Channel = Channel


TRANSPORT = f"{__name__}:Transport"
