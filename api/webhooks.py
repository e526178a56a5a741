"""Webhooks at the API: the destination check at submission, and the delivery records.

A submission with a webhook is refused with 422, saying which rule refused it, when:

* the URL itself is not allowed (``destination_problems``, run with the other server
  policies on every spec, so a batch's errors carry line numbers): a non-global IP literal
  in any spelling, a local-only name;
* its host name resolves to a non-global address (``vet_webhooks``: each distinct host of
  the request is resolved once, here, without blocking the event loop; ``resolve`` is the
  one function that touches DNS);
* the endpoint was disabled for the tenant (it answered 410 Gone), or the tenant has no
  signing secret (nothing is ever sent unsigned).

Workers check the destination again before every attempt (``workers.webhook_http``).
"""

from __future__ import annotations

import asyncio
import functools
import socket
import time
from collections.abc import Iterable
from ipaddress import ip_address
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Request
from pydantic import BaseModel, Field

from agent.destinations import (
    Allowlist,
    Destination,
    DestinationError,
    IPAddress,
    check_addresses,
    check_url,
)
from agent.models import TaskSpec
from api.auth import Tenant
from api.errors import ApiError, JSONOut, not_found
from api.schemas import ERRORS
from api.strict import known_query_only
from store.webhook_secrets import has_secret
from store.webhooks import delivery_view, disabled_endpoints

RESOLVE_TIMEOUT_S = 3.0
MAX_HOSTS_TO_RESOLVE = 50  # distinct webhook host names per request
RESOLVE_CONCURRENCY = 8


def destination_problems(spec: TaskSpec, allowlist: Allowlist) -> list[str]:
    """The spec's webhook problems that need no I/O (``check_url``)."""
    if spec.webhook is None:
        return []
    problem = _url_problem(spec.webhook.url, allowlist)
    return [problem] if problem else []


@functools.lru_cache(maxsize=1024)  # a batch names the same URL on many lines
def _url_problem(url: str, allowlist: Allowlist) -> str | None:
    try:
        check_url(url, allowlist)
    except DestinationError as e:
        return f"webhook.url: {e.reason}"
    return None


async def resolve(host: str, port: int) -> list[IPAddress]:
    """The host's addresses. Tests replace this function."""
    loop = asyncio.get_running_loop()
    infos = await asyncio.wait_for(
        loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), RESOLVE_TIMEOUT_S
    )
    out: list[IPAddress] = []
    for *_, sockaddr in infos:
        ip = ip_address(str(sockaddr[0]).split("%")[0])
        if ip not in out:
            out.append(ip)
    return out


async def vet_webhooks(
    state: Any, tenant: str, specs: Iterable[TaskSpec], batch_url: str | None = None
) -> None:
    """Raise a 422 ``ApiError`` listing every webhook problem of this submission that
    needs Redis or DNS to see (the URLs' own syntax and policy were checked already)."""
    where = {s.webhook.url: "webhook.url" for s in specs if s.webhook is not None}
    if batch_url is not None:
        where[batch_url] = "webhook_url"
    if not where:
        return
    allowlist: Allowlist = state.settings.allowlist
    problems: list[str] = []
    if not await has_secret(state.redis, state.keys, tenant):
        problems.append(
            "webhook: this tenant has no webhook signing secret, and webhooks are always "
            "signed: ask the operator to run `actfleet keys rotate-webhook-secret --tenant "
            f"{tenant}` (it prints the secret once)"
        )
    dests: dict[str, Destination] = {}
    for url, field in where.items():
        try:
            dests[url] = check_url(url, allowlist)
        except DestinationError as e:
            problems.append(f"{field}: {e.reason}")
    by_host: dict[tuple[str, int], list[str]] = {}
    for url, dest in dests.items():
        if dest.ip is None and not allowlist.allows_host(dest.host):
            by_host.setdefault((dest.host, dest.port), []).append(url)
    if len(by_host) > MAX_HOSTS_TO_RESOLVE:
        raise ApiError(
            422,
            f"the webhooks name {len(by_host)} different hosts; at most "
            f"{MAX_HOSTS_TO_RESOLVE} per request are checked: split the batch",
        )
    gate = asyncio.Semaphore(RESOLVE_CONCURRENCY)

    async def problem_of(host: str, port: int, url: str) -> str:
        async with gate:
            problem = await _host_problem(dests[url], host, port, allowlist)
        return f"{where[url]}: {problem}" if problem else ""

    found = await asyncio.gather(*(problem_of(h, p, urls[0]) for (h, p), urls in by_host.items()))
    problems += [p for p in found if p]
    canonical = {dest.url: url for url, dest in dests.items()}
    disabled = await disabled_endpoints(state.redis, state.keys, tenant, list(canonical))
    for url, since in disabled.items():
        problems.append(
            f"{where[canonical[url]]}: {url} answered 410 Gone at "
            f"{time.strftime('%Y-%m-%d %H:%M:%SZ', time.gmtime(since))} and is disabled for "
            "this tenant: use another URL, or ask the operator to run `actfleet keys "
            f"enable-webhook --tenant {tenant} {url}`"
        )
    if problems:
        raise ApiError(422, "the webhook is refused: " + "; ".join(problems), problems=problems)


async def _host_problem(dest: Destination, host: str, port: int, allowlist: Allowlist) -> str:
    try:
        addresses = await resolve(host, port)
    except (OSError, UnicodeError, TimeoutError) as e:
        return f"host {host!r} does not resolve ({e or 'timed out'}): use a public host name"
    try:
        check_addresses(dest, addresses, allowlist)
    except DestinationError as e:
        return e.reason
    return ""


# -- GET /v1/tasks/{id}/webhook, /v1/batches/{id}/webhook ---------------------------------

router = APIRouter(
    prefix="/v1",
    tags=["webhooks"],
    responses=ERRORS,
    default_response_class=JSONOut,
    dependencies=[Depends(known_query_only)],
)


class AttemptOut(BaseModel):
    attempt: int
    at: float | None = Field(None, description="when the attempt started (unix s)")
    outcome: str = Field(
        description="delivered, retrying, failed, disabled, refused, given_up, or lost "
        "(its worker died mid-attempt)"
    )
    status_code: int | None = Field(None, description="the receiver's HTTP status, if any")
    error: str | None = Field(None, description="why there was no usable answer")
    latency_ms: float | None = None
    address: str | None = Field(None, description="the IP address the request went to")
    next_attempt_at: float | None = None
    rule: str | None = Field(None, description="for refused: the destination rule")


class WebhookOut(BaseModel):
    id: str = Field(description="the webhook-id header of every attempt")
    event: str
    url: str
    state: str = Field(
        description="waiting (not finished yet), scheduled, delivering, pending (a retry "
        "is due at next_attempt_at), or final: delivered, failed, given_up, disabled, refused"
    )
    attempts: list[AttemptOut]
    next_attempt_at: float | None = None
    created_at: float | None = None
    settled_at: float | None = None
    deadline: float | None = Field(None, description="no retry after this (unix s)")


_NO_WEBHOOK: dict[int | str, dict[str, Any]] = {
    404: {"description": "no such object for this key, or it has no webhook"}
}


@router.get("/tasks/{task_id}/webhook", response_model=WebhookOut, responses=_NO_WEBHOOK)
async def task_webhook(
    request: Request, task_id: Annotated[str, Path(max_length=64)], tenant: Tenant
) -> dict[str, Any]:
    """The task's ``task.finished`` delivery: its state and every attempt."""
    state = request.app.state
    rec = await state.store.get_task(tenant, task_id)
    if rec is None:
        raise not_found("task", task_id)
    if rec.spec.webhook is None:
        raise ApiError(404, f"task {task_id!r} has no webhook")
    return {"url": rec.spec.webhook.url, **await delivery_view(state.redis, state.keys, rec.id)}


@router.get("/batches/{batch_id}/webhook", response_model=WebhookOut, responses=_NO_WEBHOOK)
async def batch_webhook(
    request: Request, batch_id: Annotated[str, Path(max_length=64)], tenant: Tenant
) -> dict[str, Any]:
    """The batch's ``batch.finished`` delivery: its state and every attempt."""
    state = request.app.state
    batch = await state.batches.get(tenant, batch_id)
    if batch is None:
        raise not_found("batch", batch_id)
    if batch.webhook_url is None:
        raise ApiError(
            404, f"batch {batch_id!r} has no webhook (submit with ?webhook_url= to get one)"
        )
    return {"url": batch.webhook_url, **await delivery_view(state.redis, state.keys, batch.id)}
