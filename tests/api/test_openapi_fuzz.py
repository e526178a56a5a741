"""Schemathesis against the served OpenAPI document: a real uvicorn API on a real
redis-server, authenticated with a real key, every built-in check on.

Request bodies are generated from the document's schemas, so this holds the document to
what the validator takes: a schema-valid body must get 202 (positive data acceptance), a
schema-violating one a 4xx (negative data rejection), and no request may get a 5xx or a
response that differs from what is advertised. Bounded to a few minutes: a fixed number of
examples per operation, derandomized so that CI runs the same cases every time.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis
import schemathesis
from hypothesis import HealthCheck, settings

from api import webhooks as api_webhooks
from api.app import create_app
from store.apikeys import create_key
from store.keys import Keys
from tests.api.conftest import ApiServer, fleet_settings

# A small batch cap keeps the largest generated batch quick; a tenant budget far above
# what the run submits keeps valid bodies from meeting 429 (no worker drains the queue).
OVERRIDES: dict[str, Any] = {"max_active_per_tenant": 1_000_000, "max_batch_tasks": 100}
DOCUMENT = create_app(fleet_settings("redis://127.0.0.1:1/0", **OVERRIDES)).openapi()
# 413 is this API's documented refusal of a body or a batch that is too large.
REJECTED = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429"]
CONFIG = schemathesis.Config.from_dict(
    {"checks": {"negative_data_rejection": {"expected-statuses": [*REJECTED, "5xx"]}}}
)
schema = schemathesis.openapi.from_dict(DOCUMENT, config=CONFIG)
statuses: Counter[tuple[str, int]] = Counter()


@schemathesis.serializer("application/x-ndjson")
def _ndjson(ctx: schemathesis.SerializationContext, value: Any) -> bytes:
    """A batch file: one task spec per line (what is not a list is sent as one line)."""
    items = value if isinstance(value, list) else [value]
    return b"".join(json.dumps(item).encode() + b"\n" for item in items)


@schema.hook("map_case")
def _what_a_schema_cannot_say(ctx: schemathesis.HookContext, case: schemathesis.Case) -> Any:
    """Two rules JSON Schema cannot express, applied to generated requests (``map_case``
    runs in every phase, the coverage phase included):

    - webhooks go (``webhook`` in a spec, ``webhook_url`` of a batch): a webhook URL is
      checked against SSRF rules (no schema can say which hosts resolve where), and a
      test may never make a connection off loopback;
    - a batch's repeated ``custom_id`` goes: ids must be unique within a batch, and JSON
      Schema has no uniqueness of one property across items;
    - a file whose path is another's directory (or under another's path) goes: a path is a
      file or a directory, not both, which no schema of one item can say.

    Only cases meant to be valid are changed: in a case meant to violate the schema the
    violation may be one of these very fields, and the server refuses the rest of such a
    request before it would look a webhook's host up.
    """
    if case.meta is not None and not case.meta.generation.mode.is_positive:
        return case
    if isinstance(case.query, dict):
        case.query.pop("webhook_url", None)
    specs = case.body if isinstance(case.body, list) else [case.body]
    seen: set[str] = set()
    for spec in specs:
        if not isinstance(spec, dict):
            continue
        spec.pop("webhook", None)
        if isinstance(spec.get("files"), list):
            spec["files"] = _without_conflicts(spec["files"])
        custom_id = spec.get("custom_id")
        if isinstance(custom_id, str) and custom_id in seen:
            del spec["custom_id"]
        elif isinstance(custom_id, str):
            seen.add(custom_id)
    return case


def _without_conflicts(files: list[Any]) -> list[Any]:
    kept, paths, dirs = [], set(), set()
    for f in files:
        path = f.get("path") if isinstance(f, dict) else None
        if isinstance(path, str):
            parents = {"/".join(path.split("/")[:i]) for i in range(1, path.count("/") + 1)}
            if path in dirs or parents & paths:
                continue
            paths.add(path)
            dirs |= parents
        kept.append(f)
    return kept


@schema.hook("filter_case")
def _consistent_modes(ctx: schemathesis.HookContext, case: schemathesis.Case) -> bool:
    """Drop a case labelled positive whose body was generated negative (the coverage phase
    makes some while it varies a query parameter): positive data acceptance would demand
    a 2xx for a body that violates the schema."""
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive:
        return True
    return all(c.mode.is_positive for c in meta.components.values())


async def _no_dns(host: str, port: int) -> list[Any]:
    raise OSError("this test resolves no names (traffic stays on loopback)")


@pytest.fixture(scope="module")
def served(redis_url_session: str) -> Iterator[tuple[str, str]]:
    """The API's URL and a tenant's key; the API serves the document ``schema`` was made of.
    It runs in this process, with webhook host resolution replaced: a safety net, as no
    generated request carries a webhook."""
    patch = pytest.MonkeyPatch()
    patch.setattr(api_webhooks, "resolve", _no_dns)
    server = ApiServer(fleet_settings(redis_url_session, **OVERRIDES)).start()
    client = redis.Redis.from_url(redis_url_session)
    key, _ = create_key(client, Keys("t"), "fuzz")
    try:
        assert httpx.get(f"{server.url}/openapi.json").json() == DOCUMENT
        yield server.url, key
    finally:
        server.stop()
        client.close()
        patch.undo()


def test_every_built_in_check_is_on() -> None:
    checks = CONFIG.projects.get_default().checks
    for name in (
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_schema_conformance",
        "response_headers_conformance",
        "positive_data_acceptance",
        "negative_data_rejection",
        "missing_required_header",
        "ignored_auth",
        "unsupported_method",
        "allow_header_conformance",
    ):
        assert checks.get_by_name(name=name).enabled, name


@pytest.mark.timeout(600)
@schema.parametrize()
@settings(
    max_examples=50,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_the_api_keeps_the_promises_of_its_openapi_document(
    case: schemathesis.Case, served: tuple[str, str]
) -> None:
    url, key = served
    response = case.call_and_validate(base_url=url, headers={"Authorization": f"Bearer {key}"})
    statuses[(f"{case.method} {case.path}", response.status_code)] += 1


def test_bodies_generated_from_the_schema_were_queued() -> None:
    # Positive data acceptance already failed the run on any valid body refused; this
    # checks that valid bodies were sent at all, and queued.
    assert statuses[("POST /v1/tasks", 202)] > 0, statuses
    assert statuses[("POST /v1/batches", 202)] > 0, statuses
