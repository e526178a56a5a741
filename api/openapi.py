"""The OpenAPI document: FastAPI's, plus the request bodies' schemas, generated from the
task spec's table (``agent.specschema``) as this server narrows it (``api.bodies``), so
that what the document promises is what the validator takes.

``install_openapi(app, settings)`` replaces ``app.openapi``; the document is built once.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from agent.specschema import json_schema
from api.bodies import spec_rules
from api.schemas import REF_PREFIX, SPEC_REF
from config.settings import Settings


def install_openapi(app: FastAPI, settings: Settings) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_document(app, settings)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def build_document(app: FastAPI, settings: Settings) -> dict[str, Any]:
    doc = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes
    )
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    schemas.update(json_schema(spec_rules(settings).table, lambda name: REF_PREFIX + name))
    for path in doc.get("paths", {}).values():
        for operation in path.values():
            for parameter in operation.get("parameters", ()):
                parameter["schema"] = _without_null(parameter["schema"])
    schemas["Batch"] = {
        "type": "array",
        "items": {"$ref": SPEC_REF},
        "minItems": 1,
        "maxItems": settings.max_batch_tasks,
        "description": "Task specs; each `custom_id` at most once.",
    }
    return doc


def _without_null(schema: dict[str, Any]) -> dict[str, Any]:
    """An optional parameter's schema without its ``null`` branch: a query string or a
    header cannot carry null, only leave the parameter out (FastAPI documents ``X | None``
    as ``anyOf: [X, null]``, which a client would send as the text "null")."""
    branches = schema.get("anyOf")
    if not branches:
        return schema
    kept = [b for b in branches if b != {"type": "null"}]
    if len(kept) != 1:
        return schema
    rest = {k: v for k, v in schema.items() if k != "anyOf"}
    if schema.get("default", ...) is None:
        rest.pop("default")
    return {**kept[0], **rest}
