"""``/v1/tasks``: submit, read, list, cancel, and the event stream (SSE)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import StreamingResponse

from agent.models import Status
from api.auth import Tenant
from api.bodies import parse_spec, read_body, spec_rules
from api.errors import ApiError, JSONOut, not_found
from api.schemas import ERRORS, SPEC_REF, ErrorOut, TaskAccepted, TaskOut, TaskPage
from api.sse import STREAM_ID, check_event_id, event_stream
from api.strict import known_query_only
from api.submit import submit
from api.webhooks import vet_webhooks
from store.api_store import AlreadyFinished

EVENT_ID_PATTERN = f"^(?:{STREAM_ID})?$"  # what check_event_id takes; "" or 0: from the start

router = APIRouter(
    prefix="/v1/tasks",
    tags=["tasks"],
    responses=ERRORS,
    default_response_class=JSONOut,
    dependencies=[Depends(known_query_only)],
)

_SPEC_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": SPEC_REF}}},
    }
}


@router.post(
    "",
    status_code=202,
    response_model=TaskAccepted,
    openapi_extra=_SPEC_BODY,
    responses={
        400: {"model": ErrorOut, "description": "the body is not JSON"},
        413: {"model": ErrorOut, "description": "the body is too large"},
        422: {"model": ErrorOut, "description": "the spec is invalid; `problems` says why"},
        429: {"model": ErrorOut, "description": "too many unfinished tasks; see Retry-After"},
    },
)
async def create_task(request: Request, response: Response, tenant: Tenant) -> dict[str, Any]:
    """Queue one task. The body is a task spec (see the schema); answers 202 with its id."""
    settings = request.app.state.settings
    spec = parse_spec(await read_body(request, settings.max_request_bytes), spec_rules(settings))
    await vet_webhooks(request.app.state, tenant, [spec])
    [rec] = await submit(request.app.state, tenant, [spec])
    url = f"/v1/tasks/{rec.id}"
    response.headers["Location"] = url
    return {"id": rec.id, "status": "queued", "url": url, "events_url": f"{url}/events"}


@router.get("", response_model=TaskPage)
async def list_tasks(
    request: Request,
    tenant: Tenant,
    status: Annotated[Status | None, Query(description="only tasks in this status")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: Annotated[str | None, Query(pattern=r"^\d{1,12}$")] = None,
) -> dict[str, Any]:
    """The tenant's tasks, newest first. Results in this list omit the trajectory."""
    page = await request.app.state.store.list_tasks(
        tenant, status=status, limit=limit, cursor=int(cursor or 0)
    )
    tasks = []
    for rec in page.tasks:
        out = rec.public()
        if "result" in out:
            out["result"] = {**out["result"], "messages": []}
        tasks.append(out)
    nxt = page.next_cursor
    return {"tasks": tasks, "next_cursor": None if nxt is None else str(nxt)}


@router.get("/{task_id}", response_model=TaskOut)
async def get_task(request: Request, task_id: str, tenant: Tenant) -> dict[str, Any]:
    """The task, with its result (and trajectory) once it has finished."""
    rec = await request.app.state.store.get_task(tenant, task_id)
    if rec is None:
        raise not_found("task", task_id)
    return rec.public()


@router.post(
    "/{task_id}/cancel",
    status_code=202,
    response_model=TaskOut,
    responses={409: {"model": ErrorOut, "description": "the task already finished"}},
)
async def cancel_task(request: Request, task_id: str, tenant: Tenant) -> dict[str, Any]:
    """Cancel a task: a queued one is cancelled at once; a running one stops within
    seconds (watch for its ``task.finished`` event)."""
    try:
        rec = await request.app.state.store.cancel_task(tenant, task_id)
    except AlreadyFinished as e:
        raise ApiError(409, f"{e}: there is nothing to cancel", task_status=e.status) from e
    if rec is None:
        raise not_found("task", task_id)
    return rec.public()


@router.get(
    "/{task_id}/events",
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {"text/event-stream": {}},
            "description": "Server-Sent Events: `id` is the Redis stream id, `event` the "
            "event type, `data` the event JSON. The stream closes after `task.finished`.",
        },
        400: {"model": ErrorOut, "description": "a malformed Last-Event-ID"},
    },
)
async def task_events(
    request: Request,
    task_id: str,
    tenant: Tenant,
    last_event_id: Annotated[
        str | None,
        Query(
            description="resume after this event id (or send Last-Event-ID)",
            json_schema_extra={"pattern": EVENT_ID_PATTERN},
        ),
    ] = None,
    last_event_id_header: Annotated[
        str | None,
        Header(alias="Last-Event-ID", json_schema_extra={"pattern": EVENT_ID_PATTERN}),
    ] = None,
) -> StreamingResponse:
    """Replay the task's events from the start (or after ``Last-Event-ID``), then follow
    them live; each event is sent once, in order, and the stream ends after the last."""
    after = check_event_id(last_event_id_header or last_event_id)
    state = request.app.state
    if await state.store.task_status(tenant, task_id) is None:
        raise not_found("task", task_id)
    return StreamingResponse(
        event_stream(state, tenant, task_id, after),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
