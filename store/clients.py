"""Redis clients for a URL: one Redis, or a Redis Cluster.

``ACTFLEET_REDIS_URL`` names a Redis Cluster by its scheme: ``redis+cluster://host:port``
(``rediss+cluster://`` for TLS), any one of its nodes; the client finds the others and
follows the slots as they move. Every other URL is one Redis. The task queue (Celery's
broker, ``ACTFLEET_BROKER_URL``) is always one Redis: kombu does not speak the cluster
protocol.

On a cluster each script runs on the master of the slot its keys are in (``store.keys``
puts every key of a task's scripts in one slot). A script sent in a pipeline is not loaded
there on demand, so ``load_scripts`` loads them on every master first; callers that
pipeline scripts do it once, and again after a master answers ``NoScriptError`` (a
restarted or new master).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.cluster import ClusterPipeline, RedisCluster

CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}


def cluster_url(url: str) -> str | None:
    """The plain ``redis://`` URL of a cluster URL; None when ``url`` is one Redis."""
    parts = urlsplit(url)
    scheme = CLUSTER_SCHEMES.get(parts.scheme)
    return urlunsplit(parts._replace(scheme=scheme)) if scheme else None


def sync_client(url: str, **kw: Any) -> redis.Redis:
    """A client for ``url`` (``redis.Redis``, or a ``RedisCluster`` used through the same
    commands)."""
    plain = cluster_url(url)
    if plain is None:
        return redis.Redis.from_url(url, **kw)
    return cast(redis.Redis, RedisCluster.from_url(plain, **kw))


def async_client(url: str, **kw: Any) -> aioredis.Redis:
    """The asyncio twin of ``sync_client``."""
    plain = cluster_url(url)
    if plain is None:
        return aioredis.Redis.from_url(url, **kw)
    return cast(aioredis.Redis, AsyncRedisCluster.from_url(plain, **kw))


def is_cluster(client: Any) -> bool:
    return isinstance(client, RedisCluster | AsyncRedisCluster)


def load_scripts(client: Any, sources: Iterable[str]) -> None:
    """Load ``sources`` on every master of a cluster (nothing to do on one Redis)."""
    if is_cluster(client):
        for source in sources:
            client.script_load(source)


async def aload_scripts(client: Any, sources: Iterable[str]) -> None:
    if is_cluster(client):
        for source in sources:
            await client.script_load(source)


def queue_script(script: Any, pipe: Any, keys: list[str], args: list[Any]) -> None:
    """Queue ``script`` (a registered ``Script``) in the sync pipeline ``pipe``. A cluster's
    pipeline refuses its ``evalsha`` method (redis-py blocks it) but routes the EVALSHA
    command by its keys, so there it is sent as a command; the script must be loaded on
    every master first (``load_scripts``). One Redis's pipeline loads it on demand."""
    if isinstance(pipe, ClusterPipeline):
        pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
    else:
        script(keys=keys, args=args, client=pipe)
