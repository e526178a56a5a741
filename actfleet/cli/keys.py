"""``actfleet keys create|list|revoke``: API keys, written straight to Redis.

The key is printed once, at creation; only its sha256 hash is stored.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import redis

from actfleet.cli import CLIError
from actfleet.settings import Settings
from store.apikeys import ApiKeyError, create_key, list_keys, revoke_key
from store.keys import Keys


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = sub.add_parser(
        "keys", help="create, list and revoke API keys (needs ACTFLEET_REDIS_URL)"
    )
    ksub = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)

    c = ksub.add_parser("create", help="make a key for a tenant; it is shown only once")
    c.add_argument("--tenant", required=True, help="the tenant the key acts for")
    c.add_argument("--name", default="", help="a label for the key (who or what uses it)")
    c.add_argument("--json", action="store_true", help="print one JSON document")
    c.set_defaults(func=create)

    ls = ksub.add_parser("list", help="list keys (hashes only) and their tenants")
    ls.add_argument("--tenant", help="only this tenant's keys")
    ls.add_argument("--json", action="store_true", help="print one JSON document")
    ls.set_defaults(func=list_)

    r = ksub.add_parser("revoke", help="revoke a key (the key, its hash, or a hash prefix)")
    r.add_argument("key", metavar="KEY_OR_HASH")
    r.set_defaults(func=revoke)


def _client() -> tuple[redis.Redis, Keys]:
    settings = Settings()
    if not settings.redis_url:
        raise CLIError("set ACTFLEET_REDIS_URL to the Redis the API uses")
    return redis.Redis.from_url(settings.redis_url), Keys(settings.key_prefix)


def _translate(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Key errors and an unreachable Redis become one-line CLI errors."""

    def run(args: argparse.Namespace) -> int:
        try:
            return int(func(args))
        except ApiKeyError as e:
            raise CLIError(str(e)) from e
        except redis.ConnectionError as e:
            raise CLIError(f"cannot reach Redis (ACTFLEET_REDIS_URL): {e}") from e

    return run


@_translate
def create(args: argparse.Namespace) -> int:
    client, keys = _client()
    key, info = create_key(client, keys, args.tenant, args.name)
    if args.json:
        print(json.dumps({"key": key, **info.to_dict()}))
    else:
        print(key)
        print(
            f"(tenant {info.tenant}; keep it: it is not stored and cannot be shown again)",
            flush=True,
        )
    return 0


@_translate
def list_(args: argparse.Namespace) -> int:
    client, keys = _client()
    infos = list_keys(client, keys, args.tenant)
    if args.json:
        print(json.dumps({"keys": [i.to_dict() for i in infos]}))
        return 0
    for i in infos:
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(i.created_at))
        print(f"{i.key_hash[:16]}  {i.tenant:<20} {created}  {i.name}")
    if not infos:
        print("no keys")
    return 0


@_translate
def revoke(args: argparse.Namespace) -> int:
    client, keys = _client()
    info = revoke_key(client, keys, args.key)
    print(f"revoked {info.key_hash[:16]} (tenant {info.tenant})")
    return 0
