"""Reading request bodies: a byte limit, JSON with line/column errors, batch files.

The body is read here rather than declared as a pydantic model so that ``TaskSpec.from_dict``
stays the one validator, and so that a 10,000-line batch is reported line by line.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from actfleet.settings import Settings
from agent.errors import SpecError
from agent.models import TaskSpec
from api.errors import ApiError
from api.webhooks import destination_problems

MAX_REPORTED_ERRORS = 100


async def read_body(request: Request, limit: int) -> bytes:
    """The body, or 413 as soon as it is known to be over ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, "Content-Length must be a number of bytes")
        if int(declared) > limit:
            raise _too_large(int(declared), limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(size, limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(size: int, limit: int) -> ApiError:
    return ApiError(
        413,
        f"the request body is over the limit of {limit} bytes (got at least {size}): "
        "split the batch into smaller files",
        limit_bytes=limit,
    )


def parse_json(body: bytes, what: str = "the request body") -> Any:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"{what} is not UTF-8 (bad byte at offset {e.start})") from e
    if not text.strip():
        raise ApiError(400, f"{what} is empty: send a JSON task spec")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ApiError(
            400, f"{what} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}"
        ) from e


Policy = Callable[[TaskSpec], list[str]]


def server_policy(settings: Settings) -> Policy:
    """What this server refuses in a spec that is valid as such: network access it does not
    grant, a sandbox image it does not run, a webhook it will not call. Refused at the
    door, not after queueing."""
    allowlist = settings.allowlist

    def check(spec: TaskSpec) -> list[str]:
        problems = []
        if spec.sandbox.network and not settings.sandbox_allow_network:
            problems.append(
                "sandbox.network: this server does not give tasks network access; "
                "leave it out or set it to false"
            )
        image = spec.sandbox.image
        if image is not None and image != settings.sandbox_image:
            problems.append(
                f"sandbox.image: this server runs tasks in {settings.sandbox_image!r} only; "
                "leave it out"
            )
        problems.extend(destination_problems(spec, allowlist))
        return problems

    return check


def parse_spec(body: bytes, policy: Policy) -> TaskSpec:
    raw = parse_json(body)
    try:
        spec = TaskSpec.from_dict(raw)
    except SpecError as e:
        problems = e.problems
    else:
        problems = policy(spec)
        if not problems:
            return spec
    raise ApiError(422, "the task spec is invalid: " + "; ".join(problems), problems=problems)


@dataclass
class BatchInput:
    specs: list[TaskSpec] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    lines: int = 0
    bad_json: bool = False


def parse_batch(body: bytes, max_tasks: int, policy: Policy) -> list[TaskSpec]:
    """Every spec of a JSONL file (or a JSON array), or one error listing every bad line.

    Line numbers are 1-based lines of the file (blank lines are skipped but counted); for a
    JSON array they are 1-based item positions.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"the batch is not UTF-8 (bad byte at offset {e.start})") from e
    items = _items(text)
    if not items:
        raise ApiError(422, "the batch holds no tasks: send one JSON task spec per line")
    if len(items) > max_tasks:
        raise ApiError(
            413,
            f"the batch holds {len(items)} tasks; the limit is {max_tasks}: split it",
            limit_tasks=max_tasks,
        )
    out = BatchInput(lines=len(items))
    seen: dict[str, int] = {}
    for line_no, raw in items:
        problems: list[str] = []
        if isinstance(raw, json.JSONDecodeError):
            out.bad_json = True
            problems.append(f"not valid JSON: {raw.msg} at column {raw.colno}")
        else:
            try:
                spec = TaskSpec.from_dict(raw)
            except SpecError as e:
                problems.extend(e.problems)
            else:
                problems.extend(policy(spec))
                if spec.custom_id is not None:
                    if spec.custom_id in seen:
                        problems.append(
                            f"custom_id: {spec.custom_id!r} is also used on line "
                            f"{seen[spec.custom_id]}; custom_ids must be unique in a batch"
                        )
                    else:
                        seen[spec.custom_id] = line_no
                out.specs.append(spec)
        if problems:
            out.errors.append({"line": line_no, "problems": problems})
    if out.errors:
        shown = out.errors[:MAX_REPORTED_ERRORS]
        more = len(out.errors) - len(shown)
        raise ApiError(
            400 if out.bad_json else 422,
            f"{len(out.errors)} of {out.lines} lines are invalid; nothing was queued"
            + (f" (the first {len(shown)} are listed)" if more else ""),
            errors=shown,
            invalid_lines=len(out.errors),
        )
    return out.specs


def _items(text: str) -> list[tuple[int, Any]]:
    """(line number, parsed JSON or the JSONDecodeError) for each task of the batch."""
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            array = json.loads(text)
        except json.JSONDecodeError as e:
            raise ApiError(
                400,
                f"the batch is not a valid JSON array: {e.msg} at line {e.lineno}, "
                f"column {e.colno}",
            ) from e
        return list(enumerate(array, start=1))
    items: list[tuple[int, Any]] = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            items.append((line_no, json.loads(line)))
        except json.JSONDecodeError as e:
            items.append((line_no, e))
    return items
