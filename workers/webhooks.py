"""The webhook contract, as pure functions: signing, payloads, outcomes and backoff.

Signing follows the Standard Webhooks spec: ``webhook-id`` (the same on every attempt, so a
receiver can de-duplicate), ``webhook-timestamp`` (unix seconds of this attempt) and
``webhook-signature``: ``v1,`` + base64(HMAC-SHA256(key, f"{id}.{timestamp}.{body}")) where
the key is the base64-decoded part of the tenant's ``whsec_`` secret; several signatures
(during a secret rotation) are separated by spaces.

Payloads are thin: ids, status, correctness, counts and links (paths on the API, which the
receiver fetches with its API key) — never the answer or the trajectory.

Outcomes of an attempt: a 2xx is ``delivered``; 408, 429, 5xx and network errors are
retried with exponential backoff and jitter until the delivery's window ends; 410 Gone
disables the endpoint for the tenant; any other answer (3xx included: redirects are not
followed) is a final ``failed``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable, Mapping, Sequence
from enum import StrEnum
from typing import Any

from agent.backoff import Backoff, Jitter
from store.records import TaskRecord
from store.webhooks import BATCH_EVENT, TASK_EVENT

USER_AGENT = "actfleet-webhooks/1"


class Outcome(StrEnum):
    DELIVERED = "delivered"
    RETRY = "retrying"
    FAILED = "failed"  # the receiver refused it for good
    DISABLED = "disabled"  # 410 Gone: no more deliveries to this endpoint for the tenant
    REFUSED = "refused"  # the destination is not allowed (SSRF policy)
    GIVEN_UP = "given_up"  # worth retrying, but the window is spent


def secret_key(secret: str) -> bytes:
    """The HMAC key of a ``whsec_...`` secret."""
    return base64.b64decode(secret.removeprefix("whsec_"))


def sign(secret: str, msg_id: str, timestamp: int, body: str) -> str:
    mac = hmac.new(secret_key(secret), f"{msg_id}.{timestamp}.{body}".encode(), hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode()


def headers(secrets: Sequence[str], msg_id: str, timestamp: int, body: str) -> dict[str, str]:
    """The request headers of one attempt, signed with every secret in ``secrets``."""
    if not secrets:
        raise ValueError("a webhook is always signed: no secret given")
    return {
        "content-type": "application/json",
        "user-agent": USER_AGENT,
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": " ".join(sign(s, msg_id, timestamp, body) for s in secrets),
    }


def task_payload(record: TaskRecord, now: float) -> dict[str, Any]:
    """``task.finished``: which task, how it ended, where to read more."""
    result = record.result
    url = f"/v1/tasks/{record.id}"
    return _envelope(
        TASK_EVENT,
        now,
        {
            "task_id": record.id,
            "custom_id": record.spec.custom_id,
            "batch_id": record.batch_id,
            "status": record.status.value,
            "failure_class": result.failure_class.value
            if result and result.failure_class
            else None,
            "correct": result.correct if result else None,
            "turns": result.turns if result else 0,
            "attempt": record.attempt,
            "finished_at": record.finished_at,
            "links": {"task": url, "events": f"{url}/events", "webhook": f"{url}/webhook"},
        },
    )


def batch_payload(
    batch: Mapping[str, str], counts: Mapping[str, int], now: float
) -> dict[str, Any]:
    """``batch.finished``: the batch's counts per status, how many were graded correct."""
    batch_id = batch["id"]
    url = f"/v1/batches/{batch_id}"
    cancelled = batch.get("cancel_requested") == "1"
    return _envelope(
        BATCH_EVENT,
        now,
        {
            "batch_id": batch_id,
            "status": "cancelled" if cancelled else "finished",
            "total": int(batch.get("total", 0)),
            "counts": dict(counts),
            "correct": int(batch.get("correct", 0)),
            "finished_at": float(batch["finished_at"]) if batch.get("finished_at") else None,
            "links": {
                "batch": url,
                "results": f"{url}/results",
                "webhook": f"{url}/webhook",
            },
        },
    )


def body_of(payload: Mapping[str, Any]) -> str:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False)


def outcome_of(status_code: int) -> Outcome:
    if 200 <= status_code < 300:
        return Outcome.DELIVERED
    if status_code == 410:
        return Outcome.DISABLED
    if status_code in (408, 429) or status_code >= 500:
        return Outcome.RETRY
    return Outcome.FAILED


def retry_at(
    attempt: int,
    now: float,
    deadline: float,
    *,
    base_s: float,
    max_s: float,
    rand: Callable[[], float],
    retry_after_s: float | None = None,
) -> float | None:
    """When to try again after failed attempt number ``attempt`` (1-based): the backoff's
    ceiling (base, 2*base, 4*base, ... capped at ``max_s``) with equal jitter, so that
    deliveries that failed together do not return together; later when the receiver's
    ``Retry-After`` asks for later (capped at ``max_s`` too), never sooner: a receiver
    cannot make us retry in a tight loop. None once that is past ``deadline`` (give up)."""
    delay = Backoff(base_s, max_s, Jitter.EQUAL).delay_s(attempt, rand=rand)
    if retry_after_s is not None:
        delay = min(max(delay, retry_after_s), max_s)
    return None if now + delay > deadline else now + delay


def _envelope(event: str, now: float, data: dict[str, Any]) -> dict[str, Any]:
    ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"
    return {"type": event, "timestamp": ts, "data": data}
