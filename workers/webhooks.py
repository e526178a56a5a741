"""Webhook delivery, signed per the Standard Webhooks spec (standardwebhooks.com).

Headers: ``webhook-id`` (stable across retries, so receivers can de-duplicate),
``webhook-timestamp`` (unix seconds) and ``webhook-signature`` =
``"v1," + base64(HMAC-SHA256(secret, f"{id}.{timestamp}.{body}"))`` where ``secret`` is the
base64 part of ``whsec_...``. The body is the task's public record. Delivery runs as its own
Celery task (``workers.tasks``) with retries; only the attempt that finished a task
schedules it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from agent.errors import ActfleetError


class WebhookError(ActfleetError):
    """A delivery failed in a way worth retrying (network error, 5xx, 429)."""


@dataclass(frozen=True, slots=True)
class Delivery:
    msg_id: str
    url: str
    body: str


def secret_bytes(secret: str) -> bytes:
    """The HMAC key of a ``whsec_...`` secret."""
    return base64.b64decode(secret.removeprefix("whsec_"))


def sign(secret: str, msg_id: str, timestamp: int, body: str) -> str:
    mac = hmac.new(secret_bytes(secret), f"{msg_id}.{timestamp}.{body}".encode(), hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode()


def headers(secret: str | None, msg_id: str, timestamp: int, body: str) -> dict[str, str]:
    h = {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
    }
    if secret:
        h["webhook-signature"] = sign(secret, msg_id, timestamp, body)
    return h


def delivery_for(public_record: Mapping[str, Any], url: str) -> Delivery:
    body = json.dumps({"type": "task.finished", "data": dict(public_record)}, separators=(",", ":"))
    return Delivery(msg_id=f"msg_{public_record['id']}_finished", url=url, body=body)


def deliver(delivery: Delivery, secret: str | None, timestamp: int, timeout_s: float = 10.0) -> int:
    """POST once. Returns the status code for a final outcome (2xx, or a 4xx other than
    408/429: retrying will not help); raises ``WebhookError`` for one worth retrying."""
    try:
        resp = httpx.post(
            delivery.url,
            content=delivery.body.encode(),
            headers=headers(secret, delivery.msg_id, timestamp, delivery.body),
            timeout=timeout_s,
            follow_redirects=False,
        )
    except httpx.HTTPError as e:
        raise WebhookError(f"webhook to {delivery.url} failed: {e!r}") from e
    if resp.status_code >= 500 or resp.status_code in (408, 429):
        raise WebhookError(f"webhook to {delivery.url} answered {resp.status_code}")
    return resp.status_code


def backoff_s(retries: int, base_s: float = 5.0, cap_s: float = 3600.0) -> float:
    """Delay before retry number ``retries + 1``: 5 s, 10 s, 20 s, ... capped."""
    return float(min(cap_s, base_s * 2**retries))


def schedule(app: Any, task_id: str) -> None:
    """Enqueue the delivery of ``task_id``'s webhook (called by the finishing attempt)."""
    from store import keys

    app.send_task(keys.DELIVER_WEBHOOK, args=[task_id], queue=keys.WEBHOOK_QUEUE)
