"""Every exception becomes the one error body: {"error": {code, message, details}}."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError
from starlette.exceptions import HTTPException as StarletteHTTPException

from postroom.errors import PostroomError, QuotaExceeded

logger = logging.getLogger(__name__)

# The 404 of an unknown route, and of an admin route to anyone but an admin (the same body, so
# admin routes do not reveal that they exist).
NO_ROUTE = "no such route; see /docs for the routes of this API"
HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "payload_too_large",
}
# Postgres ended the request's transaction for a conflict with another (serialization failure,
# deadlock, lock timeout): nothing it did was kept, and the same request again will go through.
CONFLICT_SQLSTATES = frozenset({"40001", "40P01", "55P03"})


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
        if isinstance(exc, QuotaExceeded):
            headers = {"Retry-After": str(exc.retry_after)}
        return error_response(exc.http_status, exc.code, exc.message, exc.details, headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        details = []
        for err in exc.errors():
            where = err.get("loc", ())
            loc = [str(p) for p in where if p not in ("body", "query", "path", "header")]
            reason = str(err.get("msg", ""))
            if where[:1] == ("path",) and err.get("type", "").startswith("uuid"):
                reason = f"not a valid id ({reason}); use the id the API returned"
            if err.get("type") == "json_invalid":
                reason = f"the body is not valid JSON ({err.get('ctx', {}).get('error', '')})"
            details.append({"field": ".".join(loc) or "body", "reason": reason})
        first = details[0] if details else {"field": "body", "reason": "invalid"}
        more = f" (and {len(details) - 1} more problems)" if len(details) > 1 else ""
        return error_response(
            422,
            "invalid_input",
            f"{first['field']}: {first['reason']}{more}",
            details[:20],
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code
        message = str(exc.detail)
        if status == 404 and message == "Not Found":
            message = NO_ROUTE
        elif status == 400:
            # The framework could not read the body (JSON that is not UTF-8, nested too deeply
            # or with a number too long; a broken multipart form): the same 422 as other bad input.
            status = 422
            message = (
                "body: the request body could not be read as JSON (not UTF-8, nested too "
                "deeply, or a number too long); send one UTF-8 JSON object"
                if message == "There was an error parsing the body"
                else f"body: the request body could not be read ({message}); send a well-formed "
                "body of the documented content type"
            )
        code = "invalid_input" if status == 422 else HTTP_CODES.get(status, "http_error")
        headers = dict(exc.headers) if exc.headers else None
        details = [{"field": "body", "reason": "unreadable JSON"}] if status == 422 else None
        return error_response(status, code, message, details, headers=headers)

    @app.exception_handler(DBAPIError)
    async def _database(request: Request, exc: DBAPIError) -> JSONResponse:
        if getattr(exc.orig, "sqlstate", None) not in CONFLICT_SQLSTATES:
            return await _unexpected(request, exc)
        logger.warning("transaction ended by a conflict, answered 503: %s", exc.orig)
        return error_response(
            503,
            "unavailable",
            "the database ended this request for a conflict with another one at the same "
            "moment; nothing was changed: send the same request again",
            headers={"Retry-After": "1"},
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        request_id = request.headers.get("x-request-id", "")
        logger.exception("unhandled error")
        return error_response(
            500, "internal_error", f"internal error; quote request id {request_id!r}"
        )
