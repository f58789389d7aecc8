"""`POST /v1/jobs/upload`: the job's options from the query string, and the body's bytes (raw or a
multipart `file`, gzip or not) as an async stream."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from postroom.errors import InvalidInput, UnsupportedMediaType
from postroom.job_options import JobOptions
from postroom.jsonsafe import show

GZIP_ENCODINGS = frozenset({"gzip", "x-gzip"})
GZIP_TYPES = frozenset({"application/gzip", "application/x-gzip"})
CHUNK_BYTES = 1 << 16


def upload_options(
    labels: str,
    instructions: str | None,
    mode: str | None,
    model: str | None,
    decoding: str,
    spill: str,
    deadline: str | None,
    on_invalid: str,
    metadata: str | None,
    max_spill_cost: float | None,
    webhook_url: str | None = None,
    expires_after: int | None = None,
    priority: str = "normal",
    label_template: str | None = None,
    cascade: str | None = None,
) -> JobOptions:
    raw: dict[str, Any] = {
        "labels": json_or_csv(labels, "labels"),
        "instructions": instructions,
        "mode": mode,
        "model": model,
        "decoding": decoding,
        "spill": spill,
        "on_invalid": on_invalid,
        "max_spill_cost": max_spill_cost,
        "webhook_url": webhook_url,
        "expires_after": expires_after,
        "priority": priority,
        "label_template": label_template,
    }
    if deadline is not None:
        raw["deadline"] = float(deadline) if is_number(deadline) else deadline
    if metadata is not None:
        raw["metadata"] = json_or_csv(metadata, "metadata")
    if cascade is not None:
        raw["cascade"] = json_object(cascade, "cascade")
    try:
        return JobOptions.model_validate(raw)
    except ValidationError as e:
        details = [
            {"field": ".".join(str(p) for p in err["loc"]), "reason": err["msg"]}
            for err in e.errors()
        ]
        raise InvalidInput(f"{details[0]['field']}: {details[0]['reason']}", details=details) from e


def json_or_csv(value: str, field: str) -> Any:
    text = value.strip()
    if text.startswith(("[", "{")):
        try:
            return json.loads(text)
        except ValueError as e:
            raise InvalidInput(f"{field} is not valid JSON: {e}", details=[{"field": field}]) from e
    return [part.strip() for part in text.split(",")]


def json_object(value: str, field: str) -> Any:
    """A JSON object given as a query or form field (`cascade={"below": 0.7}`)."""
    try:
        parsed = json.loads(value)
    except ValueError as e:
        raise InvalidInput(
            f'{field} is not valid JSON: {e}; send an object like {{"below": 0.7}}',
            details=[{"field": field}],
        ) from e
    if not isinstance(parsed, dict):
        raise InvalidInput(f"{field} must be a JSON object", details=[{"field": field}])
    return parsed


def is_number(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True


async def body_source(request: Request) -> tuple[AsyncIterator[bytes], bool, str]:
    """The bytes of an upload, whether they are gzip, and what to call them in errors: the raw
    body (gzip with `Content-Encoding: gzip` or `Content-Type: application/gzip`), or the `file`
    part of a multipart form (gzip when its name ends in .gz or its type says so)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        form = await request.form()
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise InvalidInput(
                "multipart upload needs a file part named `file`", details=[{"field": "file"}]
            )
        filename = upload.filename or "file"
        part_type = (upload.content_type or "").lower()
        gzip = filename.lower().endswith(".gz") or part_type in GZIP_TYPES
        return file_chunks(upload), gzip, f"file {show(filename, 100)!r}"
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in (*GZIP_ENCODINGS, "identity", ""):
        raise UnsupportedMediaType(
            f"Content-Encoding {show(encoding)!r} is not supported; send gzip or uncompressed",
            details=[{"field": "Content-Encoding"}],
        )
    gzip = encoding in GZIP_ENCODINGS or content_type in GZIP_TYPES
    return request.stream(), gzip, "the request body"


async def file_chunks(upload: UploadFile) -> AsyncIterator[bytes]:
    while chunk := await upload.read(CHUNK_BYTES):
        yield chunk
