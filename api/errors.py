"""HTTP errors: every 4xx/5xx body is ``{"detail": {"message": ..., <more>}}``.

``message`` is one sentence saying what to fix; a spec error adds ``problems`` (one
``"field: what to fix"`` each), a batch error adds ``errors`` (``{"line", "problems"}``).
FastAPI's own validation errors (bad query parameters) are rewritten to the same shape.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from agent.text import printable


def encode_json(content: Any) -> bytes:
    """Compact JSON as UTF-8. Text UTF-8 cannot encode (a lone surrogate, say in a model's
    answer) goes out as a ``\\u`` escape instead of failing the response."""
    text = json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(content, allow_nan=False, separators=(",", ":")).encode("ascii")


class JSONOut(JSONResponse):
    """The API's JSON responses, rendered with ``encode_json``."""

    def render(self, content: Any) -> bytes:
        return encode_json(content)


class ApiError(HTTPException):
    def __init__(
        self, status: int, message: str, headers: dict[str, str] | None = None, **extra: Any
    ) -> None:
        super().__init__(status, {"message": message, **extra}, headers)


def not_found(kind: str, object_id: str) -> ApiError:
    # The same answer whether the object does not exist or belongs to another tenant.
    return ApiError(404, f"no {kind} {object_id!r} (for this API key)")


def allowed_methods(request: Request) -> list[str]:
    """Every method some route of the request's path answers."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches(request.scope)
        if match is not Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    return sorted(methods)


def install_handlers(app: FastAPI) -> None:
    async def validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("query", "path"))
            problems.append(printable(f"{where or 'request'}: {err.get('msg', 'is invalid')}"))
        message = "the request is invalid: " + "; ".join(problems)
        return JSONOut({"detail": {"message": message, "problems": problems}}, 422)

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        detail = exc.detail if isinstance(exc.detail, dict) else {"message": str(exc.detail)}
        headers = exc.headers
        if exc.status_code == 405:
            # Starlette names the methods of the first route of this path only.
            methods = allowed_methods(request)
            headers = {**(headers or {}), "Allow": ", ".join(methods)}
            detail = {"message": f"use {' or '.join(methods)} on this path"}
        return JSONOut({"detail": detail}, exc.status_code, headers=headers)

    app.add_exception_handler(RequestValidationError, validation)
    app.add_exception_handler(StarletteHTTPException, http_error)
