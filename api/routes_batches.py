"""``/v1/batches``: submit a JSONL file of task specs, follow it, stream its results."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import StreamingResponse

from api.auth import Tenant
from api.bodies import parse_batch, read_body, server_policy
from api.errors import not_found
from api.schemas import ERRORS, BatchAccepted, BatchCancelled, BatchOut, ErrorOut, TaskSpecIn
from api.submit import submit
from api.webhooks import vet_webhooks
from store.batches import BatchRecord, BatchStore
from store.records import new_batch_id

router = APIRouter(prefix="/v1/batches", tags=["batches"], responses=ERRORS)

_JSONL_BODY = {
    "requestBody": {
        "required": True,
        "description": "One task spec per line (JSONL), or a JSON array of task specs.",
        "content": {
            "application/x-ndjson": {"schema": {"type": "string"}},
            "application/json": {
                "schema": {"type": "array", "items": TaskSpecIn.model_json_schema()}
            },
        },
    }
}


@router.post(
    "",
    status_code=202,
    response_model=BatchAccepted,
    openapi_extra=_JSONL_BODY,
    responses={
        400: {"model": ErrorOut, "description": "a line is not JSON (`errors` lists them)"},
        413: {"model": ErrorOut, "description": "the body or the batch is too large"},
        422: {"model": ErrorOut, "description": "some specs are invalid (`errors` lists them)"},
        429: {"model": ErrorOut, "description": "too many unfinished tasks; see Retry-After"},
    },
)
async def create_batch(
    request: Request,
    response: Response,
    tenant: Tenant,
    webhook_url: Annotated[
        str | None,
        Query(
            max_length=2048,
            description="POST a signed `batch.finished` here once, when every task has ended",
        ),
    ] = None,
) -> dict[str, Any]:
    """Queue every task of a batch, or none: each line is checked first, and every bad
    line is reported with its number and what to fix."""
    settings = request.app.state.settings
    body = await read_body(request, settings.max_request_bytes)
    specs = parse_batch(body, settings.max_batch_tasks, server_policy(settings))
    await vet_webhooks(request.app.state, tenant, specs, webhook_url)
    batch = BatchRecord(
        id=new_batch_id(),
        tenant=tenant,
        total=len(specs),
        created_at=time.time(),
        webhook_url=webhook_url,
    )
    await submit(request.app.state, tenant, specs, batch)
    url = f"/v1/batches/{batch.id}"
    response.headers["Location"] = url
    return {
        "id": batch.id,
        "total": batch.total,
        "status": "running",
        "url": url,
        "results_url": f"{url}/results",
    }


async def _batch(request: Request, tenant: str, batch_id: str) -> tuple[BatchStore, BatchRecord]:
    batches: BatchStore = request.app.state.batches
    batch = await batches.get(tenant, batch_id)
    if batch is None:
        raise not_found("batch", batch_id)
    return batches, batch


@router.get("/{batch_id}", response_model=BatchOut)
async def get_batch(request: Request, batch_id: str, tenant: Tenant) -> dict[str, Any]:
    """Counts per status, success rate, mean turns and token totals of finished tasks."""
    batches, batch = await _batch(request, tenant, batch_id)
    return await batches.stats(batch)


@router.get(
    "/{batch_id}/results",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/x-ndjson": {}}, "description": "JSONL"}},
)
async def batch_results(
    request: Request,
    batch_id: str,
    tenant: Tenant,
    include: Annotated[
        Literal["trajectory"] | None, Query(description="`trajectory` adds each task's messages")
    ] = None,
) -> StreamingResponse:
    """One JSON line per task, in input order, keyed by ``custom_id``; tasks still running
    appear with their current status and no answer."""
    batches, batch = await _batch(request, tenant, batch_id)

    async def lines() -> AsyncIterator[bytes]:
        buf: list[str] = []
        async for line in batches.results(batch, trajectory=include == "trajectory"):
            buf.append(json.dumps(line, separators=(",", ":"), ensure_ascii=False))
            if len(buf) >= 200:
                yield ("\n".join(buf) + "\n").encode()
                buf.clear()
        if buf:
            yield ("\n".join(buf) + "\n").encode()

    return StreamingResponse(
        lines(),
        media_type="application/x-ndjson",
        headers={"Content-Disposition": f'attachment; filename="{batch.id}.jsonl"'},
    )


@router.post("/{batch_id}/cancel", status_code=202, response_model=BatchCancelled)
async def cancel_batch(request: Request, batch_id: str, tenant: Tenant) -> dict[str, Any]:
    """Cancel every unfinished task of the batch; finished tasks keep their results."""
    batches, batch = await _batch(request, tenant, batch_id)
    return {"id": batch.id, **(await batches.cancel(batch))}
