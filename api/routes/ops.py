"""/healthz (liveness), /readyz (database, broker, S3) and /metrics (Prometheus)."""

from __future__ import annotations

import hmac
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from sqlalchemy import text

from api.schemas import ErrorBody
from postroom.errors import Unauthorized

router = APIRouter(tags=["ops"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
def readyz(request: Request) -> JSONResponse:
    state = request.app.state
    checks: dict[str, Any] = {}
    try:
        with state.sessions() as session:
            session.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as e:  # any failure means not ready; the message says which
        checks["database"] = f"error: {e.__class__.__name__}"
    try:
        with state.celery.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=3)
        checks["broker"] = "ok"
    except Exception as e:
        checks["broker"] = f"error: {e.__class__.__name__}"
    try:
        state.storage.check()
        checks["s3"] = "ok"
    except Exception as e:
        checks["s3"] = f"error: {e.__class__.__name__}"
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse(
        {"status": "ok" if ready else "unavailable", "checks": checks},
        status_code=200 if ready else 503,
    )


def _check_metrics_token(request: Request) -> None:
    """With POSTROOM_METRICS_TOKEN set, /metrics answers only `Authorization: Bearer <token>`."""
    token = request.app.state.settings.metrics_token.get_secret_value()
    if not token:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        given.strip().encode(), token.encode()
    ):
        raise Unauthorized(
            "/metrics needs `Authorization: Bearer <POSTROOM_METRICS_TOKEN>`; give Prometheus "
            "the token (scrape_configs: authorization: credentials)"
        )


@router.get("/metrics", response_class=PlainTextResponse, responses={401: {"model": ErrorBody}})
def metrics(request: Request) -> Response:
    """This process's metrics, then the deployment's, counted from Postgres (queue depth…)."""
    _check_metrics_token(request)
    body = generate_latest(REGISTRY) + generate_latest(request.app.state.metrics_registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
