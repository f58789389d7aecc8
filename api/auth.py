"""Bearer API key → the calling tenant (keys are stored hashed)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import Request
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from api.errors import NO_ROUTE
from postroom.errors import NotFound, Unauthorized
from postroom.logs import bound
from postroom.tenants import Caller, authenticate


def _authenticate(sessions: sessionmaker[Session], key: str) -> Caller:
    with sessions.begin() as session:
        return authenticate(session=session, key=key)


async def caller_from_request(request: Request) -> AsyncIterator[Caller]:
    """The caller, with its tenant id bound to every log line of the rest of the request.

    Async, so the binding happens in the request's own context (a sync dependency runs in a copy
    of it, in a worker thread); the database lookup still runs in the threadpool.
    """
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthorized(
            "missing API key: send `Authorization: Bearer <key>` "
            "(create one with `postroom keys create TENANT`)"
        )
    caller = await run_in_threadpool(_authenticate, request.app.state.sessions, key.strip())
    request.state.tenant_id = str(caller.tenant_id)  # for the request's summary log line
    with bound(tenant_id=str(caller.tenant_id)):
        yield caller


def admin_from_request(request: Request) -> Caller:
    """An admin caller (`postroom keys create TENANT --admin`). Everyone else, with no key, a
    wrong, revoked or non-admin key, gets the 404 of an unknown route: admin routes do not
    reveal that they exist."""
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise NotFound(NO_ROUTE)
    try:
        with request.app.state.sessions.begin() as session:
            caller = authenticate(session=session, key=key.strip())
    except Unauthorized as e:
        raise NotFound(NO_ROUTE) from e
    if not caller.is_admin:
        raise NotFound(NO_ROUTE)
    return caller
