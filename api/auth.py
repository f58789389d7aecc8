"""Bearer API key → the calling tenant (keys are stored hashed)."""

from __future__ import annotations

from fastapi import Request

from postroom.errors import Unauthorized
from postroom.tenants import Caller, authenticate


def caller_from_request(request: Request) -> Caller:
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthorized(
            "missing API key: send `Authorization: Bearer <key>` "
            "(create one with `postroom keys create TENANT`)"
        )
    with request.app.state.sessions.begin() as session:
        return authenticate(session=session, key=key.strip())
