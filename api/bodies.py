"""Reading request bodies: a byte limit, strict JSON with line/column errors, batch files.

The body is read here rather than declared as a pydantic model so that ``TaskSpec.from_dict``
(with the server's ``SpecRules``) stays the one validator, and so that a 10,000-line batch
is reported line by line.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from typing import Any

from fastapi import Request

from agent.destinations import Allowlist
from agent.errors import SpecError
from agent.models import TaskSpec
from agent.specschema import (
    MAX_DEPTH,
    TASK_SPEC,
    Flag,
    Kind,
    Number,
    OneOf,
    Section,
    find,
    narrow,
)
from agent.text import printable
from api.errors import ApiError
from api.webhooks import destination_problems
from config.settings import Settings
from engines.re2engine import spec_problems

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


MAX_INT_DIGITS = 4300  # Python's own limit on converting text to an int


class JSONRefused(ValueError):
    """Valid JSON syntax that this API does not take (NaN, a key twice, too deep...)."""


def _no_constant(name: str) -> Any:
    raise JSONRefused(f"{name} is not a JSON number; send a finite number (or null)")


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise JSONRefused(f"the number {text[:40]} is beyond the range of a 64-bit float")
    return value


def _int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_INT_DIGITS:
        raise JSONRefused(f"an integer has {digits} digits; the limit is {MAX_INT_DIGITS}")
    return int(text)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise JSONRefused(printable(f"the key {key!r} appears twice in one object"))
            seen.add(key)
    return out


def loads(text: str) -> Any:
    """``json.loads``, stricter: no NaN or Infinity, no number that a float or an int
    cannot hold, no key twice in one object, nesting only as deep as the parser's recursion
    limit. Raises ``json.JSONDecodeError`` (bad syntax) or ``JSONRefused``."""
    try:
        return json.loads(
            text,
            parse_constant=_no_constant,
            parse_float=_finite,
            parse_int=_int,
            object_pairs_hook=_unique_keys,
        )
    except RecursionError as e:
        raise JSONRefused(
            f"it is nested too deeply: a task spec may nest {MAX_DEPTH} levels at most"
        ) from e


def parse_json(body: bytes, what: str = "the request body") -> Any:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"{what} is not UTF-8 (bad byte at offset {e.start})") from e
    if not text.strip():
        raise ApiError(400, f"{what} is empty: send a JSON task spec")
    try:
        return loads(text)
    except json.JSONDecodeError as e:
        raise ApiError(
            400, f"{what} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}"
        ) from e
    except JSONRefused as e:
        raise ApiError(400, f"{what} is not acceptable JSON: {e}") from e


@dataclass(frozen=True)
class SpecRules:
    """How this server reads a task spec: ``table`` is ``specschema.TASK_SPEC`` narrowed
    to what the server grants (the table its OpenAPI document is made from too); RE2
    checks the patterns of regex graders, ``allowlist`` the webhooks the server will call
    (what needs no I/O: ``api.webhooks.vet_webhooks`` resolves their hosts)."""

    table: Section
    allowlist: Allowlist

    def read(self, raw: Any) -> tuple[TaskSpec | None, list[str]]:
        """The spec, or None and every problem."""
        try:
            spec = TaskSpec.from_dict(raw, self.table)
        except SpecError as e:
            return None, e.problems
        problems = spec_problems(spec) + destination_problems(spec, self.allowlist)
        return (None, problems) if problems else (spec, [])


def spec_rules(settings: Settings) -> SpecRules:
    """The rules for ``settings``: its caps on memory and CPUs, its one image, no network
    unless it grants it, its webhook allowlist; each refusal names the setting or says what
    to change."""
    key = (
        settings.sandbox_max_memory_mb,
        settings.sandbox_max_cpus,
        settings.sandbox_image,
        settings.sandbox_allow_network,
        settings.webhook_allowlist,
    )
    found = _rules.get(key)
    if found is None:
        found = _rules[key] = SpecRules(_narrowed(settings), settings.allowlist)
    return found


_rules: dict[tuple[Any, ...], SpecRules] = {}


def _narrowed(settings: Settings) -> Section:
    memory = find(TASK_SPEC, "sandbox.memory_mb").kind
    cpus = find(TASK_SPEC, "sandbox.cpus").kind
    assert isinstance(memory, Number) and isinstance(cpus, Number)
    image = settings.sandbox_image
    changes: dict[str, Kind] = {
        "sandbox.memory_mb": replace(
            memory,
            hi=min(memory.hi, settings.sandbox_max_memory_mb),
            cap="this server's cap, ACTFLEET_SANDBOX_MAX_MEMORY_MB",
        ),
        "sandbox.cpus": replace(
            cpus,
            hi=min(cpus.hi, settings.sandbox_max_cpus),
            cap="this server's cap, ACTFLEET_SANDBOX_MAX_CPUS",
        ),
        "sandbox.image": OneOf(
            (image,), refusal=f"this server runs tasks in {image!r} only; leave it out"
        ),
    }
    if not settings.sandbox_allow_network:
        changes["sandbox.network"] = Flag(
            only=False,
            refusal="this server does not give tasks network access; leave it out or set "
            "it to false",
        )
    return narrow(TASK_SPEC, changes)


def parse_spec(body: bytes, rules: SpecRules) -> TaskSpec:
    spec, problems = rules.read(parse_json(body))
    if spec is None:
        raise ApiError(422, "the task spec is invalid: " + "; ".join(problems), problems=problems)
    return spec


@dataclass
class BatchInput:
    specs: list[TaskSpec] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    lines: int = 0
    bad_json: bool = False


def parse_batch(body: bytes, max_tasks: int, rules: SpecRules) -> list[TaskSpec]:
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
        elif isinstance(raw, JSONRefused):
            out.bad_json = True
            problems.append(f"not acceptable JSON: {raw}")
        else:
            spec, found = rules.read(raw)
            problems.extend(found)
            if spec is not None:
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
    """(line number, parsed JSON or the JSONDecodeError / JSONRefused) for each task of
    the batch."""
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            array = loads(text)
        except json.JSONDecodeError as e:
            raise ApiError(
                400,
                f"the batch is not a valid JSON array: {e.msg} at line {e.lineno}, "
                f"column {e.colno}",
            ) from e
        except JSONRefused as e:
            raise ApiError(400, f"the batch is not acceptable JSON: {e}") from e
        return list(enumerate(array, start=1))
    items: list[tuple[int, Any]] = []
    # Lines end at \n (and \r\n): str.splitlines would also split a line at characters a
    # JSON string may hold unescaped (U+2028, U+0085, ...).
    for line_no, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            items.append((line_no, loads(line)))
        except (json.JSONDecodeError, JSONRefused) as e:
            items.append((line_no, e))
    return items
