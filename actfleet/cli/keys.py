"""``actfleet keys create|list|revoke|rotate-webhook-secret|enable-webhook``: API keys and
the tenants' webhook signing secrets, written straight to Redis.

A key is printed once, at creation; only its sha256 hash is stored. A tenant's first key
also makes the tenant's webhook signing secret (``whsec_...``), printed once with it;
``rotate-webhook-secret`` prints a new one and keeps the old one signing alongside for a
grace window. Neither the API nor the CLI ever shows a secret again.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import redis

from actfleet.cli import CLIError
from config.settings import Settings
from store.apikeys import ApiKeyError, check_tenant, issue_key, list_keys, revoke_key
from store.clients import sync_client
from store.keys import Keys
from store.webhook_secrets import rotate
from store.webhooks import enable_endpoint


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

    w = ksub.add_parser(
        "rotate-webhook-secret",
        help="give a tenant a new webhook signing secret (shown once); the old one keeps "
        "signing too for a grace window",
    )
    w.add_argument("--tenant", required=True)
    w.add_argument(
        "--grace-s",
        type=float,
        help="how long both signatures are sent (default ACTFLEET_WEBHOOK_ROTATION_GRACE_S)",
    )
    w.add_argument("--json", action="store_true", help="print one JSON document")
    w.set_defaults(func=rotate_webhook_secret)

    e = ksub.add_parser(
        "enable-webhook", help="let a webhook URL that answered 410 Gone receive deliveries again"
    )
    e.add_argument("--tenant", required=True)
    e.add_argument("url", metavar="URL")
    e.set_defaults(func=enable_webhook)


def _client() -> tuple[redis.Redis, Keys]:
    settings = Settings()
    if not settings.redis_url:
        raise CLIError("set ACTFLEET_REDIS_URL to the Redis the API uses")
    return sync_client(settings.redis_url), Keys(settings.key_prefix)


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
    issued = issue_key(client, keys, args.tenant, args.name)
    if args.json:
        print(
            json.dumps(
                {
                    "key": issued.key,
                    **issued.info.to_dict(),
                    "webhook_secret": issued.webhook_secret,
                }
            )
        )
        return 0
    print(issued.key)
    print(
        f"(tenant {issued.info.tenant}; keep it: it is not stored and cannot be shown again)",
        flush=True,
    )
    if issued.webhook_secret:
        print(issued.webhook_secret)
        print(
            "(the tenant's webhook signing secret: verify deliveries with it; it is shown "
            "only now, with the tenant's first key)",
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
def rotate_webhook_secret(args: argparse.Namespace) -> int:
    settings = Settings()
    client, keys = _client()
    check_tenant(args.tenant)
    grace_s = settings.webhook_rotation_grace_s if args.grace_s is None else args.grace_s
    if grace_s < 0:
        raise CLIError("--grace-s must be 0 or more seconds")
    rotation = rotate(client, keys, args.tenant, grace_s)
    until = rotation.previous_valid_until
    if args.json:
        print(
            json.dumps(
                {
                    "tenant": args.tenant,
                    "webhook_secret": rotation.secret,
                    "previous_valid_until": until,
                }
            )
        )
        return 0
    print(rotation.secret)
    when = (
        "the old secret also signs every delivery until "
        + time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(until))
        if until is not None
        else "there was no secret before"
    )
    print(f"(tenant {args.tenant}'s new webhook signing secret, shown only now; {when})")
    return 0


@_translate
def enable_webhook(args: argparse.Namespace) -> int:
    from agent.destinations import DestinationError, parse_url

    client, keys = _client()
    check_tenant(args.tenant)
    try:
        url = parse_url(args.url).url
    except DestinationError as e:
        raise CLIError(f"URL: {e.reason}") from e
    if not enable_endpoint(client, keys, args.tenant, url):
        raise CLIError(f"{url} is not disabled for tenant {args.tenant}")
    print(f"enabled {url} for tenant {args.tenant}")
    return 0


@_translate
def revoke(args: argparse.Namespace) -> int:
    client, keys = _client()
    info = revoke_key(client, keys, args.key)
    print(f"revoked {info.key_hash[:16]} (tenant {info.tenant})")
    return 0
