"""OpenAPI `responses=` of routes: the error statuses a route can answer, each with the one body."""

from __future__ import annotations

from typing import Any

from api.schemas import ErrorBody


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for these error statuses, each documented with `ErrorBody`."""
    return {status: {"model": ErrorBody} for status in statuses}
