"""The JSON body of `POST /v1/jobs` checked beyond what pydantic sees: duplicate keys, NaN, NUL,
lone surrogates, deep metadata, a deadline past the calendar (a dependency of the route)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import Depends, Request

from api.deps import SettingsDep
from postroom.errors import InvalidInput
from postroom.jsonsafe import json_problem, parse_json, show
from postroom.settings import Settings


async def raw_body(request: Request, settings: SettingsDep) -> Any:
    """The JSON body parsed again, keeping what plain `json.loads` hides (duplicate keys, NaN);
    the options are checked here, the documents line by line in the intake."""
    try:
        raw = parse_json(await request.body())
    except (ValueError, RecursionError):
        return None  # FastAPI has already refused it, or will, with its own message
    if isinstance(raw, dict):
        duplicates = getattr(raw, "duplicates", ())
        if duplicates:
            name = show(duplicates[0])
            raise InvalidInput(
                f"{name}: duplicate key in the request body; send each field once",
                details=[{"field": name, "reason": "duplicate key"}],
            )
        check_options({k: v for k, v in raw.items() if k != "documents"}, settings=settings)
    return raw


def check_options(options: Any, *, settings: Settings) -> None:
    """Refuse options Postroom cannot store (NUL, lone surrogates, NaN, duplicate keys, metadata
    nested too deeply) or act on (a deadline past the calendar), naming the field."""
    problem = json_problem(options, path="", max_depth=settings.max_metadata_depth, level=0)
    if problem:
        field = problem[0] or "body"
        raise InvalidInput(
            f"{field}: {problem[1]}", details=[{"field": field, "reason": problem[1]}]
        )
    deadline = options.get("deadline") if isinstance(options, dict) else None
    if isinstance(deadline, int | float) and not isinstance(deadline, bool):
        try:
            datetime.now(UTC) + timedelta(seconds=float(deadline))
        except (OverflowError, ValueError) as e:
            raise InvalidInput(
                "deadline: too far in the future; send seconds from now or an ISO 8601 time",
                details=[{"field": "deadline", "reason": "out of range"}],
            ) from e


RawBody = Annotated[Any, Depends(raw_body)]
