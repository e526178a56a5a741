"""Each tenant's webhook signing secrets (Standard Webhooks ``whsec_`` + base64 of 32 random
bytes), in ``{p}:tenant:{t}:whsec``.

The secret is created together with the tenant's first API key and shown once, by
``actfleet keys create``; nothing reads it back out but the workers, which sign with it.
``rotate`` makes a new one and keeps the old one valid for a grace window, during which
every delivery carries both signatures (``webhook-signature: v1,<new> v1,<old>``), so a
receiver can switch over at its own pace. A second rotation within the window drops the
oldest secret.
"""

from __future__ import annotations

import base64
import secrets
import time
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio as aioredis

from agent.text import text_of
from store.keys import Keys

SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32

# ROTATE: KEYS: 1 the tenant's secrets hash. ARGV: 1 new secret, 2 previous valid until,
# 3 now. Returns 1 when there was a secret to keep as the previous one, else 0.
ROTATE = """
local cur = redis.call('HGET', KEYS[1], 'current')
if cur then
  redis.call('HSET', KEYS[1], 'previous', cur, 'previous_until', ARGV[2])
else
  redis.call('HDEL', KEYS[1], 'previous', 'previous_until')
end
redis.call('HSET', KEYS[1], 'current', ARGV[1], 'rotated_at', ARGV[3])
if cur then return 1 end
return 0
"""


@dataclass(frozen=True, slots=True)
class Rotation:
    secret: str  # the new secret: show it once
    previous_valid_until: float | None  # None: there was no secret before


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def create_if_missing(pipe: Any, keys: Keys, tenant: str, secret: str) -> None:
    """Queue on ``pipe`` (a MULTI pipeline): store ``secret`` unless the tenant has one.
    The command's reply (1 or 0) says whether it was stored."""
    pipe.hsetnx(keys.webhook_secrets(tenant), "current", secret)


def rotate(
    client: redis.Redis, keys: Keys, tenant: str, grace_s: float, now: float | None = None
) -> Rotation:
    now = time.time() if now is None else now
    secret = new_secret()
    had = client.eval(
        ROTATE, 1, keys.webhook_secrets(tenant), secret, repr(now + grace_s), repr(now)
    )
    return Rotation(secret, now + grace_s if int(had) else None)


def signing_secrets(client: redis.Redis, keys: Keys, tenant: str, now: float) -> list[str]:
    """The secrets to sign with now: the current one, then the previous one while its
    grace window lasts. Empty when the tenant has none."""
    cur, prev, until = client.hmget(
        keys.webhook_secrets(tenant), ["current", "previous", "previous_until"]
    )
    out = [text_of(cur)] if cur else []
    if prev and until and float(text_of(until)) > now:
        out.append(text_of(prev))
    return out


async def has_secret(client: aioredis.Redis, keys: Keys, tenant: str) -> bool:
    return bool(await client.hexists(keys.webhook_secrets(tenant), "current"))
