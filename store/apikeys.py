"""API keys: random bearer tokens, stored only as their sha256 hash, each owned by a tenant.

A key is ``af_`` + 32 random url-safe bytes; it is shown once, at creation, and never
stored. A tenant's first key also creates its webhook signing secret (shown once, with
the key). ``{p}:apikey:{sha256}`` maps the hash to its tenant; ``{p}:apikeys`` indexes every
hash for ``keys list`` / ``keys revoke``. The CLI uses the sync functions (it writes to Redis
directly); the API only looks keys up, with ``lookup_tenant`` on its asyncio client.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio as aioredis

from agent.errors import ActfleetError
from agent.text import text_of
from store import webhook_secrets
from store.clients import is_cluster
from store.keys import Keys

KEY_PREFIX = "af_"
_TENANT = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class ApiKeyError(ActfleetError):
    """A key operation was asked with bad input (a bad tenant name, an unknown key)."""


@dataclass(frozen=True, slots=True)
class ApiKeyInfo:
    key_hash: str
    tenant: str
    name: str
    created_at: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "key_hash": self.key_hash,
            "tenant": self.tenant,
            "name": self.name,
            "created_at": self.created_at,
        }


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def check_tenant(tenant: str) -> str:
    if not _TENANT.match(tenant):
        raise ApiKeyError(
            f"tenant: use 1-64 characters from letters, digits and ._- (got {tenant!r})"
        )
    return tenant


@dataclass(frozen=True, slots=True)
class IssuedKey:
    key: str  # show it once
    info: ApiKeyInfo
    webhook_secret: str | None  # the tenant's signing secret when this key created it


def issue_key(client: redis.Redis, keys: Keys, tenant: str, name: str = "") -> IssuedKey:
    """Make a key for ``tenant``, and the tenant's webhook signing secret with its first
    key (``store.webhook_secrets``), in one transaction; both are shown once."""
    check_tenant(tenant)
    key = new_key()
    info = ApiKeyInfo(hash_key(key), tenant, name, time.time())
    secret = webhook_secrets.new_secret()
    pipe = client.pipeline(transaction=not is_cluster(client))  # one slot each: not on a cluster
    pipe.hset(
        keys.apikey(info.key_hash),
        mapping={"tenant": tenant, "name": name, "created_at": repr(info.created_at)},
    )
    pipe.zadd(keys.apikeys, {info.key_hash: info.created_at})
    webhook_secrets.create_if_missing(pipe, keys, tenant, secret)
    created = pipe.execute()[-1]
    return IssuedKey(key, info, secret if int(created) else None)


def create_key(
    client: redis.Redis, keys: Keys, tenant: str, name: str = ""
) -> tuple[str, ApiKeyInfo]:
    """``issue_key`` for callers that do not show the webhook secret (tests, tools)."""
    issued = issue_key(client, keys, tenant, name)
    return issued.key, issued.info


def list_keys(client: redis.Redis, keys: Keys, tenant: str | None = None) -> list[ApiKeyInfo]:
    hashes = [text_of(h) for h in client.zrange(keys.apikeys, 0, -1)]
    pipe = client.pipeline(transaction=False)
    for h in hashes:
        pipe.hgetall(keys.apikey(h))
    out = []
    for h, rec in zip(hashes, pipe.execute(), strict=True):
        if not rec:
            continue
        d = {text_of(k): text_of(v) for k, v in rec.items()}
        info = ApiKeyInfo(h, d.get("tenant", ""), d.get("name", ""), float(d.get("created_at", 0)))
        if tenant is None or info.tenant == tenant:
            out.append(info)
    return out


def revoke_key(client: redis.Redis, keys: Keys, key_or_hash: str) -> ApiKeyInfo:
    """Revoke a key given the key itself, its hash, or a unique prefix (>= 8) of its hash."""
    if key_or_hash.startswith(KEY_PREFIX):
        candidates = [hash_key(key_or_hash)]
    else:
        if len(key_or_hash) < 8:
            raise ApiKeyError("give the key, its sha256 hash, or at least 8 characters of the hash")
        candidates = [
            i.key_hash for i in list_keys(client, keys) if i.key_hash.startswith(key_or_hash)
        ]
    if len(candidates) > 1:
        raise ApiKeyError(f"{key_or_hash!r} matches {len(candidates)} keys; give more characters")
    found = [i for i in list_keys(client, keys) if candidates and i.key_hash == candidates[0]]
    if not found:
        raise ApiKeyError(f"no such key: {key_or_hash!r}")
    pipe = client.pipeline(transaction=not is_cluster(client))  # one slot each: not on a cluster
    pipe.delete(keys.apikey(found[0].key_hash))
    pipe.zrem(keys.apikeys, found[0].key_hash)
    pipe.execute()
    return found[0]


async def lookup_tenant(client: aioredis.Redis, keys: Keys, key: str) -> str | None:
    """The tenant owning ``key``, or None for an unknown (or revoked) key."""
    if not key.startswith(KEY_PREFIX) or len(key) > 200:
        return None
    tenant = await client.hget(keys.apikey(hash_key(key)), "tenant")
    return text_of(tenant) if tenant else None
