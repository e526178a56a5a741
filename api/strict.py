"""A request says only what the API knows: a query parameter no route declares (a typo
such as ``?stauts=queued``) is refused with 422 naming it, rather than silently ignored.

Routers add ``Depends(known_query_only)``; it declares no parameter of its own, so it adds
nothing to the OpenAPI document.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request

from agent.text import printable
from api.errors import ApiError


async def known_query_only(request: Request) -> None:
    route = request.scope.get("route")
    dependant = getattr(route, "dependant", None)
    if dependant is None:
        return
    known = _query_names(dependant)
    unknown = [name for name in dict.fromkeys(request.query_params) if name not in known]
    if unknown:
        where = ", ".join(known) if known else "none"
        problems = [
            printable(f"{name!r}: unknown query parameter (known: {where})") for name in unknown
        ]
        raise ApiError(422, "the request is invalid: " + "; ".join(problems), problems=problems)


def _query_names(dependant: Any) -> list[str]:
    """The query parameters a route's dependant declares, its sub-dependencies' too."""
    names = [p.alias for p in dependant.query_params]
    for sub in dependant.dependencies:
        names += [n for n in _query_names(sub) if n not in names]
    return names
