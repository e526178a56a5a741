"""``/v1/batches``: submit a JSONL file of task specs, follow it, stream its results."""

from __future__ import annotations

import gc
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import StreamingResponse

from agent.export import Filter, export_line, needs_trajectory
from api.auth import Tenant
from api.bodies import BatchParser, read_batch, spec_rules
from api.errors import JSONOut, encode_json, not_found
from api.schemas import BATCH_REF, ERRORS, BatchAccepted, BatchCancelled, BatchOut, ErrorOut
from api.strict import known_query_only
from api.submit import Submitting
from api.webhooks import vet_webhooks
from store.batches import BatchRecord, BatchStore
from store.records import new_batch_id

EXPORT_CHUNK = 100  # task records read at a time by an export: its memory bound

router = APIRouter(
    prefix="/v1/batches",
    tags=["batches"],
    responses=ERRORS,
    default_response_class=JSONOut,
    dependencies=[Depends(known_query_only)],
)

_BATCH = {"$ref": BATCH_REF}
_JSONL_BODY = {
    "requestBody": {
        "required": True,
        "description": "One task spec per line (JSONL: `application/x-ndjson`, each line one "
        "item of the array below), or a JSON array of task specs; `custom_id`s must be "
        "unique within a batch.",
        "content": {
            "application/x-ndjson": {"schema": _BATCH},
            "application/json": {"schema": _BATCH},
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
    state = request.app.state
    settings = state.settings
    with no_gc_pauses():
        parser = BatchParser(settings.max_batch_tasks, spec_rules(settings))
        batch_id = new_batch_id()
        submitting = Submitting(state, tenant, batch_id)
        try:  # the tasks are staged as they are read (invisible until the commit)
            specs = await read_batch(
                request, settings.max_request_bytes, parser, ahead=submitting.add
            )
            await vet_webhooks(state, tenant, specs, webhook_url)
            batch = BatchRecord(
                id=batch_id,
                tenant=tenant,
                total=len(specs),
                created_at=time.time(),
                webhook_url=webhook_url,
            )
            await submitting.commit(specs, batch)
        finally:
            await submitting.abandon()  # what a bad line or a lost client left staged
    url = f"/v1/batches/{batch.id}"
    response.headers["Location"] = url
    return {
        "id": batch.id,
        "total": batch.total,
        "status": "running",
        "url": url,
        "results_url": f"{url}/results",
    }


_gc_holds = 0
_gc_was_enabled = True


@contextmanager
def no_gc_pauses() -> Iterator[None]:
    """No cyclic garbage collection while a batch is read and queued. A batch builds some
    ten objects per task that all survive until it is queued, the case where every full
    collection scans them all again: that took half of the parse time of a 100,000-task
    batch. Reference counting still frees everything short-lived; collections resume when
    the last batch in progress is done."""
    global _gc_holds, _gc_was_enabled
    if _gc_holds == 0:
        _gc_was_enabled = gc.isenabled()
        gc.disable()
    _gc_holds += 1
    try:
        yield
    finally:
        _gc_holds -= 1
        if _gc_holds == 0 and _gc_was_enabled:
            gc.enable()


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

    return _jsonl(batches.results(batch, trajectory=include == "trajectory"), f"{batch.id}.jsonl")


@router.get(
    "/{batch_id}/export",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/x-ndjson": {}}, "description": "JSONL"}},
)
async def export_batch(
    request: Request,
    batch_id: str,
    tenant: Tenant,
    fmt: Annotated[
        Literal["openai", "sharegpt", "results"],
        Query(
            alias="format",
            description="`openai` / `sharegpt`: fine-tuning conversations; `results`: rows",
        ),
    ] = "results",
    only_correct: Annotated[bool, Query(description="keep tasks graded correct")] = False,
    only_completed: Annotated[bool, Query(description="keep tasks that answered")] = False,
    max_turns: Annotated[
        int | None, Query(ge=0, description="keep tasks of at most this many turns")
    ] = None,
    include: Annotated[
        Literal["trajectory"] | None,
        Query(description="`trajectory` adds each task's messages to `results` rows"),
    ] = None,
) -> StreamingResponse:
    """The batch in a format to take away, one JSON line per kept task, in input order.
    ``openai`` and ``sharegpt`` hold the tasks that answered, each conversation ending with
    the answer; the filters narrow any format. Streamed a page of tasks at a time."""
    batches, batch = await _batch(request, tenant, batch_id)
    keep = Filter(only_correct, only_completed, max_turns)
    trajectory = include == "trajectory" or needs_trajectory(fmt)

    async def exported() -> AsyncIterator[dict[str, Any]]:
        async for line in batches.results(batch, trajectory=trajectory, chunk_size=EXPORT_CHUNK):
            out = export_line(line, fmt, keep, trajectory=include == "trajectory")
            if out is not None:
                yield out

    return _jsonl(exported(), f"{batch.id}.{fmt}.jsonl")


def _jsonl(rows: AsyncIterator[dict[str, Any]], filename: str) -> StreamingResponse:
    """Rows as JSONL, sent in writes of up to 200 lines or about 1 MB, whichever is first
    (a line with a trajectory can be large)."""

    async def lines() -> AsyncIterator[bytes]:
        buf: list[bytes] = []
        size = 0
        async for row in rows:
            buf.append(encode_json(row) + b"\n")
            size += len(buf[-1])
            if len(buf) >= 200 or size >= 1 << 20:
                yield b"".join(buf)
                buf.clear()
                size = 0
        if buf:
            yield b"".join(buf)

    return StreamingResponse(
        lines(),
        media_type="application/x-ndjson",
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


@router.post("/{batch_id}/cancel", status_code=202, response_model=BatchCancelled)
async def cancel_batch(request: Request, batch_id: str, tenant: Tenant) -> dict[str, Any]:
    """Cancel every unfinished task of the batch; finished tasks keep their results."""
    batches, batch = await _batch(request, tenant, batch_id)
    return {"id": batch.id, **(await batches.cancel(batch))}
