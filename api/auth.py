"""Bearer API keys -> tenant. A route depends on ``Tenant`` and sees only that tenant's data."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from api.errors import ApiError
from store.apikeys import lookup_tenant

_bearer = HTTPBearer(
    auto_error=False,
    description="An API key from `actfleet keys create --tenant NAME`.",
)
_CHALLENGE = {"WWW-Authenticate": "Bearer"}


async def current_tenant(
    request: Request,
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    if creds is None:
        raise ApiError(
            401,
            "missing API key: send the header 'Authorization: Bearer <key>' "
            "(create a key with `actfleet keys create --tenant NAME`)",
            headers=_CHALLENGE,
        )
    state = request.app.state
    tenant = await lookup_tenant(state.redis, state.keys, creds.credentials)
    if tenant is None:
        raise ApiError(401, "invalid or revoked API key", headers=_CHALLENGE)
    return tenant


Tenant = Annotated[str, Depends(current_tenant)]
