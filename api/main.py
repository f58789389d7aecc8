"""create_app(): lifespan (database, S3, Celery), routers, error handlers, request ids."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import parse_qsl

from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import error_response, install_error_handlers
from api.openai import routes as openai_routes
from api.routes import admin, jobs, ops, status, webhooks
from postroom.db.session import make_engine, make_sessionmaker
from postroom.errors import InvalidInput, PayloadTooLarge, PostroomError, RequestTimeout
from postroom.jsonsafe import show
from postroom.logs import bound, configure_logging
from postroom.metrics import HTTP_REQUESTS, HTTP_SECONDS
from postroom.postgres_metrics import PostgresCollector
from postroom.queue import make_celery
from postroom.settings import Settings, get_settings
from postroom.storage import Storage

logger = logging.getLogger(__name__)
_WRITES = {"POST", "PUT", "PATCH", "DELETE"}


class RequestMetricsMiddleware:
    """Count and time requests by route template; log one line per write (or server error) with
    the request id and the caller's tenant. Never the query string or the body."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope.setdefault("state", {})  # shared with request.state, where auth leaves the tenant
        method = scope["method"]
        started = time.perf_counter()
        status = 500

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                HTTP_SECONDS.labels(method, _route(scope)).observe(time.perf_counter() - started)
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            route = _route(scope)
            HTTP_REQUESTS.labels(method, route, str(status)).inc()
            if method in _WRITES or status >= 500:
                with bound(tenant_id=scope["state"].get("tenant_id")):
                    logger.log(
                        logging.WARNING if status >= 500 else logging.INFO,
                        "%s %s %d %.3fs",
                        method,
                        route,
                        status,
                        time.perf_counter() - started,
                    )


def _route(scope: Scope) -> str:
    route = scope.get("route")
    return str(getattr(route, "path", "unmatched"))


# Streamed uploads: bounded by POSTROOM_MAX_UPLOAD_BYTES; every other body by MAX_REQUEST_BYTES.
UPLOAD_PATHS = frozenset({"/v1/jobs/upload", "/v1/files"})


class RequestGuardMiddleware:
    """Refuse a NUL character anywhere in the URL (422: no route can store or look it up), and
    bound every request body: its size (413 before a byte is read when Content-Length says
    so, else as soon as the count passes the limit) and its pace (408 after
    POSTROOM_REQUEST_IDLE_TIMEOUT_SECONDS without a chunk, or POSTROOM_REQUEST_DEADLINE_SECONDS
    in all, counted from the app's first read). Once a body is refused, whatever the app
    answers is replaced by the refusal: the app sees the error as an exception from `receive`
    and may have turned it into something else (FastAPI answers 400 to a body it could not
    read); the upload route deletes what it wrote when it sees it. After the last chunk,
    `receive` is passed through untouched (it then only waits for a disconnect)."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        nul = _nul_in_url(scope)
        if nul is not None:
            await _refuse(
                InvalidInput(
                    f"{nul}: contains a NUL character (%00); remove it",
                    details=[{"field": nul, "reason": "NUL character"}],
                ),
                scope,
                receive,
                send,
            )
            return
        settings = self.settings
        if scope["path"] in UPLOAD_PATHS:
            limit, setting = settings.max_upload_bytes, "POSTROOM_MAX_UPLOAD_BYTES"
        else:
            limit, setting = settings.max_request_bytes, "POSTROOM_MAX_REQUEST_BYTES"
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await _refuse(_too_large(declared, limit, setting), scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        deadline: float | None = None  # from the first read: time spent before is the server's
        received = 0
        body_done = False
        started = False
        refusal: PostroomError | None = None

        async def guarded_receive() -> Message:
            nonlocal deadline, received, body_done, refusal
            if body_done:
                return await receive()
            if deadline is None:
                deadline = loop.time() + settings.request_deadline_seconds
            wait = min(settings.request_idle_timeout_seconds, deadline - loop.time())
            try:
                message = await asyncio.wait_for(receive(), timeout=max(wait, 0.0))
            except TimeoutError:
                refusal = _too_slow(settings, received)
                raise refusal from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    refusal = _too_large(received, limit, setting)
                    raise refusal
                body_done = not message.get("more_body", False)
            else:
                body_done = True
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refusal is not None:
                return  # the refusal goes out below instead
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, guarded_receive, guarded_send)
        except PostroomError:
            if refusal is None:
                raise
        if refusal is not None and not started:
            await _refuse(refusal, scope, receive, send)


def _nul_in_url(scope: Scope) -> str | None:
    """The query parameter (or "path") that carries a NUL character, if any."""
    if "\x00" in scope["path"]:
        return "path"
    query = scope.get("query_string", b"").decode("latin-1")
    if "%00" in query or "\x00" in query:
        for name, value in parse_qsl(query, keep_blank_values=True):
            if "\x00" in name or "\x00" in value:
                return show(name) or "query"
        return "query"
    return None


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _too_large(size: int, limit: int, setting: str) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"the request body is over {limit:,} bytes ({setting}); "
        + (
            "split the file into smaller uploads"
            if setting == "POSTROOM_MAX_UPLOAD_BYTES"
            else "stream large document sets to POST /v1/jobs/upload instead"
        ),
        details=[{"field": "body", "reason": f"at least {size:,} bytes"}],
    )


def _too_slow(settings: Settings, received: int) -> RequestTimeout:
    return RequestTimeout(
        f"the request body arrived too slowly: nothing for "
        f"{settings.request_idle_timeout_seconds:g}s (POSTROOM_REQUEST_IDLE_TIMEOUT_SECONDS), or "
        f"not all of it within {settings.request_deadline_seconds:g}s "
        "(POSTROOM_REQUEST_DEADLINE_SECONDS); send it again without pauses. No job was created.",
        details=[{"field": "body", "reason": f"{received:,} bytes received"}],
    )


async def _refuse(error: PostroomError, scope: Scope, receive: Receive, send: Send) -> None:
    response = error_response(error.http_status, error.code, error.message, error.details)
    response.headers["connection"] = "close"
    await response(scope, receive, send)


class RequestIdMiddleware:
    """Bind a request id (from X-Request-Id or new) to logs and echo it in the response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers", []))
        request_id = headers.get(b"x-request-id", b"").decode()[:64] or uuid.uuid4().hex

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", []).append((b"x-request-id", request_id.encode()))
            await send(message)

        with bound(request_id=request_id):
            await self.app(scope, receive, send_with_id)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = make_engine(settings)
        app.state.settings = settings
        app.state.sessions = make_sessionmaker(engine)
        app.state.storage = Storage(settings)
        app.state.celery = make_celery(settings)
        # Queue depth and the like, counted from Postgres at scrape time (GET /metrics).
        app.state.metrics_registry = CollectorRegistry(auto_describe=True)
        app.state.metrics_registry.register(PostgresCollector(app.state.sessions, settings))
        yield
        engine.dispose()

    app = FastAPI(
        title="Postroom",
        version="0.1.0",
        description="Classify documents in bulk. Every document gets exactly one result.",
        lifespan=lifespan,
    )
    app.include_router(jobs.router)
    app.include_router(ops.router)
    app.include_router(status.router)
    app.include_router(webhooks.router)
    app.include_router(openai_routes.router)
    app.include_router(admin.router)
    install_error_handlers(app)
    app.add_middleware(RequestGuardMiddleware, settings=settings)
    app.add_middleware(RequestMetricsMiddleware)
    app.add_middleware(RequestIdMiddleware)  # outermost: the request id is bound inside
    return app


def run_api(settings: Settings, *, host: str, port: int) -> None:
    import uvicorn

    configure_logging()
    uvicorn.run(create_app(settings), host=host, port=port, log_config=None, access_log=False)
