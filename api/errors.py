"""Every exception becomes the one error body: {"error": {code, message, details}}."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from postroom.errors import PostroomError

logger = logging.getLogger(__name__)


def error_response(
    status: int,
    code: str,
    message: str,
    details: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = {"error": {"code": code, "message": message, "details": details or []}}
    return JSONResponse(body, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(PostroomError)
    async def _postroom(_: Request, exc: PostroomError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.http_status == 401 else None
        return error_response(exc.http_status, exc.code, exc.message, exc.details, headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        details = []
        for err in exc.errors():
            loc = [
                str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path", "header")
            ]
            details.append({"field": ".".join(loc) or "body", "reason": err.get("msg", "")})
        first = details[0] if details else {"field": "body", "reason": "invalid"}
        return error_response(
            422,
            "invalid_input",
            f"{first['field']}: {first['reason']}",
            details[:20],
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        request_id = request.headers.get("x-request-id", "")
        logger.exception("unhandled error")
        return error_response(
            500, "internal_error", f"internal error; quote request id {request_id!r}"
        )
