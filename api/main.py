"""create_app(): lifespan (database, S3, Celery), routers, error handlers, request ids."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import install_error_handlers
from api.routes import batches, jobs, ops
from postroom.db.session import make_engine, make_sessionmaker
from postroom.logs import bound, configure_logging
from postroom.queue import make_celery
from postroom.settings import Settings, get_settings
from postroom.storage import Storage


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
    app.include_router(batches.openai_router)
    install_error_handlers(app)
    app.add_middleware(RequestIdMiddleware)
    return app


def run_api(settings: Settings, *, host: str, port: int) -> None:
    import uvicorn

    configure_logging()
    uvicorn.run(create_app(settings), host=host, port=port, log_config=None, access_log=False)
