"""OpenAI Batch API over jobs: files, request lines → one job, and the output and error lines.

A batch is a job. Its input file's request lines are parsed here; the classifiable ones go through
postroom.submit (same shards, workers and guarantees) with `custom_id` as the document id, and every
other line becomes an error line at once. When the job ends, the first read of the batch moves it to
`finalizing` (compare-and-set, so one reader wins) and writes the output and error files under ids
and S3 keys derived from the batch id: a second writer rewrites the same objects, never new ones.

Functions take the session and never commit: the route owns the transaction.
"""

from __future__ import annotations

import enum
import hashlib
import json
import logging
import math
import re
import tempfile
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import IO, TYPE_CHECKING, Any, BinaryIO

from botocore.exceptions import ClientError
from pydantic import ValidationError
from sqlalchemy import select, tuple_, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from postroom.db.batch_models import Batch, File
from postroom.db.models import Job, Result, Shard
from postroom.domain import SHARD_FINISHED, JobSpec, JobStatus, Label
from postroom.errors import Conflict, InvalidInput, NotFound, PayloadTooLarge
from postroom.intake import Intake, LineSplitter
from postroom.jobs import cancel_job, job_counts
from postroom.keys import input_shard_key
from postroom.settings import Settings
from postroom.storage import Storage
from postroom.submit import (
    JobOptions,
    ShardWriter,
    check_intake,
    finish_submission,
    new_intake,
    prepare_spec,
)

if TYPE_CHECKING:
    from botocore.response import StreamingBody

logger = logging.getLogger(__name__)

ENDPOINT = "/v1/chat/completions"
PURPOSE_INPUT = "batch"
PURPOSE_OUTPUT = "batch_output"
# Candidates for settings (POSTROOM_BATCH_*): OpenAI's own file limit, the longest window accepted,
# and how long a `finalizing` batch may stay claimed before another reader takes the work over.
MAX_FILE_BYTES = 200 * 1024 * 1024
MAX_WINDOW_SECONDS = 30 * 86_400
FINALIZE_STALE_SECONDS = 600
SPOOL_BYTES = 8 * 1024 * 1024  # output files spill to disk past this; never whole in memory
LOGPROB_FLOOR = -9999.0  # what OpenAI reports for a token of (near) zero probability
MAX_TOP_LOGPROBS = 20
_WINDOW = re.compile(r"^\s*(\d+)\s*([smhd])\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86_400}


class BatchStatus(enum.StrEnum):
    validating = "validating"
    failed = "failed"
    in_progress = "in_progress"
    finalizing = "finalizing"
    completed = "completed"
    expired = "expired"
    cancelling = "cancelling"
    cancelled = "cancelled"


BATCH_ENDED = (
    BatchStatus.completed,
    BatchStatus.failed,
    BatchStatus.expired,
    BatchStatus.cancelled,
)


# -- ids and keys (deterministic, derived from ids only)
def new_file_id() -> str:
    return f"file-{uuid.uuid4().hex}"


def batch_public_id(batch_id: uuid.UUID) -> str:
    return f"batch_{batch_id.hex}"


def output_file_id(batch_id: uuid.UUID) -> str:
    return f"file-{batch_id.hex}-output"


def error_file_id(batch_id: uuid.UUID) -> str:
    return f"file-{batch_id.hex}-errors"


def file_key(file_id: str) -> str:
    return f"files/{file_id}.jsonl"


def invalid_lines_key(batch_id: uuid.UUID) -> str:
    """Error lines of the requests refused at creation; the error file starts with them."""
    return f"batches/{batch_id}/invalid-lines.jsonl"


def _digest(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:32]


def request_line_id(batch_id: uuid.UUID, key: str) -> str:
    return f"batch_req_{_digest(str(batch_id), key)}"


# -- files
def create_file(
    *,
    session: Session,
    storage: Storage,
    tenant_id: uuid.UUID,
    fileobj: BinaryIO,
    filename: str,
    purpose: str,
) -> File:
    """Store an uploaded file (already spooled by the multipart parser) in S3, chunk by chunk."""
    if purpose != PURPOSE_INPUT:
        raise InvalidInput(
            f"purpose {purpose!r} is not supported; upload batch input with purpose=batch",
            details=[{"field": "purpose"}],
        )
    size = fileobj.seek(0, 2)
    if size > MAX_FILE_BYTES:
        raise PayloadTooLarge(
            f"the file is {size:,} bytes; the limit is {MAX_FILE_BYTES:,}: split it into batches",
            details=[{"field": "file"}],
        )
    file_id = new_file_id()
    _upload(storage, file_key(file_id), fileobj)
    row = File(
        id=file_id,
        tenant_id=tenant_id,
        purpose=purpose,
        filename=filename[:512],
        bytes=size,
        status="processed",
    )
    session.add(row)
    session.flush()
    return row


def find_file(*, session: Session, tenant_id: uuid.UUID, file_id: str) -> File:
    row = session.get(File, file_id) if len(file_id) <= 64 else None
    if row is None or row.tenant_id != tenant_id:
        raise NotFound(
            f"no file {file_id!r}; check the id (files of other tenants are not visible)"
        )
    return row


def delete_file(*, session: Session, storage: Storage, tenant_id: uuid.UUID, file_id: str) -> None:
    row = find_file(session=session, tenant_id=tenant_id, file_id=file_id)
    session.delete(row)
    session.flush()
    storage.client.delete_object(Bucket=storage.bucket, Key=file_key(file_id))


def list_files(
    *, session: Session, tenant_id: uuid.UUID, purpose: str | None, after: str | None, limit: int
) -> tuple[list[File], bool]:
    """The tenant's files, newest first; `after` is the last id of the previous page."""
    query = select(File).where(File.tenant_id == tenant_id)
    if purpose:
        query = query.where(File.purpose == purpose)
    if after:
        anchor = find_file(session=session, tenant_id=tenant_id, file_id=after)
        query = query.where(tuple_(File.created_at, File.id) < (anchor.created_at, anchor.id))
    rows = list(
        session.scalars(query.order_by(File.created_at.desc(), File.id.desc()).limit(limit + 1))
    )
    return rows[:limit], len(rows) > limit


def open_file(storage: Storage, file_id: str) -> StreamingBody:
    """The S3 body of a file, opened before any byte is sent so a missing object is a 404."""
    try:
        return storage.client.get_object(Bucket=storage.bucket, Key=file_key(file_id))["Body"]
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            raise NotFound(f"the content of file {file_id!r} is gone; upload it again") from e
        raise


def _upload(storage: Storage, key: str, fileobj: IO[bytes]) -> None:
    fileobj.seek(0)
    # upload_fileobj reads in parts (multipart upload past 8 MiB), never the whole file at once.
    storage.client.upload_fileobj(
        fileobj, storage.bucket, key, ExtraArgs={"ContentType": "application/jsonl"}
    )


# -- request lines (pure)
class LineError(Exception):
    """A request line that cannot run; it becomes an error line, never a dropped one."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Task:
    """What all lines of one batch share: they run as one job."""

    model: str
    labels: tuple[Label, ...]
    instructions: str | None


@dataclass(frozen=True)
class Request:
    """One classifiable request line. `answer` is how its label is written: `text`, `json` (a
    JSON string) or `property:<name>` (a JSON object with that one property)."""

    task: Task
    text: str
    answer: str
    top_logprobs: int | None  # None: no logprobs asked

    def metadata(self, line: int) -> dict[str, Any]:
        out: dict[str, Any] = {"line": line, "answer": self.answer}
        if self.top_logprobs is not None:
            out["top_logprobs"] = self.top_logprobs
        return out


def decode_line(raw: bytes | None, *, line: int, settings: Settings) -> tuple[dict[str, Any], str]:
    """A line's JSON object and its custom_id; LineError when either is unusable."""
    if raw is None:
        raise LineError(
            "line_too_long",
            f"line {line} is over {settings.max_document_bytes:,} bytes "
            "(POSTROOM_MAX_DOCUMENT_BYTES); shorten the request",
        )
    try:
        obj = json.loads(raw)
    except ValueError as e:
        raise LineError(
            "invalid_json_line", f"line {line} is not valid JSON ({e}); each line is one object"
        ) from e
    if not isinstance(obj, dict):
        raise LineError(
            "invalid_json_line", f"line {line} is a JSON {type(obj).__name__}, not an object"
        )
    custom_id = obj.get("custom_id")
    if custom_id is None or custom_id == "":
        raise LineError(
            "missing_custom_id",
            f"line {line} has no custom_id; every request needs a unique custom_id string",
        )
    if not isinstance(custom_id, str) or len(custom_id) > settings.max_id_length:
        raise LineError(
            "invalid_custom_id",
            f"line {line}: custom_id must be a string of 1 to {settings.max_id_length} characters",
        )
    return obj, custom_id


def parse_request(obj: dict[str, Any], *, line: int, settings: Settings) -> Request:
    """Map a chat-completions request line to a classification, or raise LineError saying why.

    A `model` that is not a registry alias (say `gpt-4o-mini`) runs on the default model
    (POSTROOM_MODEL); the output's `model` names the alias that ran.
    """
    if obj.get("method") != "POST":
        raise LineError(
            "invalid_method", f'line {line}: method is {obj.get("method")!r}; it must be "POST"'
        )
    if obj.get("url") != ENDPOINT:
        raise LineError(
            "invalid_url",
            f"line {line}: url is {obj.get('url')!r}; every line of this batch must use {ENDPOINT}",
        )
    body = obj.get("body")
    if not isinstance(body, dict):
        raise LineError("invalid_request", f"line {line}: body must be a chat.completions object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise LineError("invalid_request", f"line {line}: body.model must be a non-empty string")
    instructions, text = _messages(body.get("messages"), line)
    labels, answer = _labels_and_answer(body, line)
    top_logprobs = _logprobs_request(body, line)
    alias = model if model in settings.models else settings.model
    task = Task(model=alias, labels=labels, instructions=instructions)
    return Request(task=task, text=text, answer=answer, top_logprobs=top_logprobs)


def _text(content: Any, line: int, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise LineError(
                    "invalid_request", f"line {line}: {where} has a non-text part; only text runs"
                )
            parts.append(str(part.get("text", "")))
        return "\n".join(parts)
    raise LineError("invalid_request", f"line {line}: {where} content must be text")


def _messages(messages: Any, line: int) -> tuple[str | None, str]:
    if not isinstance(messages, list) or not messages:
        raise LineError("invalid_request", f"line {line}: body.messages must be a non-empty list")
    system: list[str] = []
    user: str | None = None
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise LineError("invalid_request", f"line {line}: messages[{index}] is not an object")
        role = message.get("role")
        if role in ("system", "developer"):
            system.append(_text(message.get("content"), line, f"messages[{index}]"))
        elif role == "user":
            user = _text(message.get("content"), line, f"messages[{index}]")
    if user is None:
        raise LineError(
            "invalid_request",
            f"line {line}: no user message; the last user message is the document to classify",
        )
    if not user.strip():
        raise LineError("invalid_request", f"line {line}: the last user message is empty")
    if "\x00" in user:
        raise LineError("invalid_request", f"line {line}: the user message contains a NUL")
    instructions = "\n\n".join(part.strip() for part in system if part.strip())
    return instructions or None, user


NOT_A_CLASSIFICATION = (
    'give response_format {"type": "json_schema", "json_schema": {"schema": {"type": "object", '
    '"properties": {"label": {"type": "string", "enum": [labels…]}}}}} or the extension '
    '"postroom": {"labels": [labels…]}'
)


def _labels_and_answer(body: dict[str, Any], line: int) -> tuple[tuple[Label, ...], str]:
    extension = _extension_labels(body.get("postroom"), line)
    enum_values: list[str] | None = None
    answer = "text"
    response_format = body.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") == "json_schema":
        json_schema = response_format.get("json_schema")
        schema = json_schema.get("schema") if isinstance(json_schema, dict) else None
        enum_values, answer = _schema_enum(schema, line)
    elif isinstance(response_format, dict) and response_format.get("type") == "json_object":
        answer = "property:label"
    if extension is None and enum_values is None:
        raise LineError(
            "not_a_classification",
            f"line {line} is not a classification request: {NOT_A_CLASSIFICATION}",
        )
    if extension is not None:
        if enum_values is not None and [label.name for label in extension] != enum_values:
            raise LineError(
                "invalid_request",
                f"line {line}: postroom.labels and the schema's enum differ; give the same list",
            )
        return extension, answer
    assert enum_values is not None
    return tuple(Label(name=value) for value in enum_values), answer


def _extension_labels(extension: Any, line: int) -> tuple[Label, ...] | None:
    if extension is None:
        return None
    if not isinstance(extension, dict) or set(extension) != {"labels"}:
        raise LineError(
            "invalid_request",
            f'line {line}: postroom must be {{"labels": [names or {{"name", "description"}}]}}',
        )
    raw = extension["labels"]
    if not isinstance(raw, list):
        raise LineError("invalid_request", f"line {line}: postroom.labels must be a list")
    try:
        return tuple(
            Label(name=item) if isinstance(item, str) else Label.model_validate(item)
            for item in raw
        )
    except ValidationError as e:
        raise LineError(
            "invalid_request",
            f"line {line}: postroom.labels items are names or {{name, description}} objects ({e})",
        ) from e


def _schema_enum(schema: Any, line: int) -> tuple[list[str], str]:
    """The enum of a classification schema and the answer shape it asks for."""
    where = f"line {line} is not a classification request: response_format.json_schema.schema"
    if not isinstance(schema, dict):
        raise LineError("not_a_classification", f"{where} is missing")
    if "enum" in schema:
        values, answer = schema["enum"], "json"
    else:
        properties = schema.get("properties")
        if not isinstance(properties, dict) or len(properties) != 1:
            count = len(properties) if isinstance(properties, dict) else 0
            raise LineError(
                "not_a_classification",
                f"{where} has {count} properties; it needs exactly one, whose enum is the labels",
            )
        ((name, prop),) = properties.items()
        if not isinstance(prop, dict) or "enum" not in prop:
            raise LineError(
                "not_a_classification",
                f"{where}: property {name!r} has no enum; its enum is the label set",
            )
        values, answer = prop["enum"], f"property:{name}"
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise LineError("not_a_classification", f"{where}: the enum must be a list of strings")
    return values, answer


def _logprobs_request(body: dict[str, Any], line: int) -> int | None:
    logprobs = body.get("logprobs")
    top = body.get("top_logprobs")
    if logprobs not in (None, True, False):
        raise LineError("invalid_request", f"line {line}: logprobs must be true or false")
    if top is not None and (
        not isinstance(top, int) or isinstance(top, bool) or not 0 <= top <= MAX_TOP_LOGPROBS
    ):
        raise LineError(
            "invalid_request",
            f"line {line}: top_logprobs must be an integer from 0 to {MAX_TOP_LOGPROBS}",
        )
    if logprobs is not True:
        if top:
            raise LineError("invalid_request", f"line {line}: top_logprobs needs logprobs: true")
        return None
    return top or 0


# -- output and error lines (pure)
def error_line(
    batch_id: uuid.UUID, *, key: str, custom_id: str | None, code: str, message: str
) -> dict[str, Any]:
    """An OpenAI batch error line. `key` makes its id: the line number for lines refused at
    creation (a duplicate custom_id must not share its id), the custom_id for documents."""
    return {
        "id": request_line_id(batch_id, key),
        "custom_id": custom_id,
        "response": None,
        "error": {"code": code, "message": message},
    }


def answer_content(answer: str, label: str) -> str:
    """The message content a request's response_format asks for, holding the label."""
    if answer == "json":
        return json.dumps(label, ensure_ascii=False)
    if answer.startswith("property:"):
        return json.dumps({answer.removeprefix("property:"): label}, ensure_ascii=False)
    return label


def _logprob(p: float) -> float:
    return max(math.log(p), LOGPROB_FLOOR) if p > 0 else LOGPROB_FLOOR


def _token(name: str, p: float) -> dict[str, Any]:
    return {"token": name, "logprob": _logprob(p), "bytes": list(name.encode())}


def label_logprobs(
    label: str, *, distribution: dict[str, float] | None, confidence: float | None, top: int
) -> dict[str, Any]:
    """One pseudo-token per label (its name), logprob = ln(probability over the label set)."""
    probs = distribution or {label: confidence if confidence is not None else 1.0}
    ranked = sorted(probs.items(), key=lambda item: item[1], reverse=True)[:top]
    chosen = _token(label, probs.get(label, confidence or 0.0))
    chosen["top_logprobs"] = [_token(name, p) for name, p in ranked]
    return {"content": [chosen], "refusal": None}


def output_line(batch_id: uuid.UUID, *, doc: dict[str, Any], row: Result) -> dict[str, Any]:
    """An OpenAI batch output line for a classified document."""
    meta = doc.get("metadata") or {}
    custom_id = str(doc["id"])
    label = row.label or ""
    top = meta.get("top_logprobs")
    logprobs = (
        label_logprobs(label, distribution=row.distribution, confidence=row.confidence, top=top)
        if top is not None
        else None
    )
    digest = _digest(str(batch_id), custom_id)
    completion = {
        "id": f"chatcmpl-{digest}",
        "object": "chat.completion",
        "created": int(row.updated_at.timestamp()),
        "model": row.model,
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": answer_content(str(meta.get("answer", "text")), label),
                    "refusal": None,
                },
                "logprobs": logprobs,
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": row.tokens_in,
            "completion_tokens": row.tokens_out,
            "total_tokens": row.tokens_in + row.tokens_out,
        },
        "system_fingerprint": row.revision,
        "postroom": {"label": label, "confidence": row.confidence, "truncated": row.truncated},
    }
    return {
        "id": request_line_id(batch_id, custom_id),
        "custom_id": custom_id,
        "response": {"status_code": 200, "request_id": f"req_{digest}", "body": completion},
        "error": None,
    }


# -- creation
def parse_completion_window(value: str) -> int:
    """`24h`, `90m`, `2d`, `30s` → seconds (OpenAI accepts only `24h`; Postroom any such span)."""
    match = _WINDOW.match(value)
    seconds = int(match[1]) * _UNIT_SECONDS[match[2]] if match else 0
    if not 0 < seconds <= MAX_WINDOW_SECONDS:
        raise InvalidInput(
            f"completion_window {value!r} is not valid: give a number and s, m, h or d "
            f"(e.g. 24h), at most {MAX_WINDOW_SECONDS // 86_400}d",
            details=[{"field": "completion_window"}],
        )
    return seconds


class _ErrorLines:
    """Error lines written to a spool (disk past SPOOL_BYTES); the first few kept for `errors`."""

    def __init__(self, batch_id: uuid.UUID, spool: IO[bytes], *, keep: int) -> None:
        self.batch_id = batch_id
        self.spool = spool
        self.keep = keep
        self.count = 0
        self.first: list[dict[str, Any]] = []

    def add(self, *, custom_id: str | None, line: int, error: LineError) -> None:
        self.count += 1
        if len(self.first) < self.keep:
            self.first.append({"code": error.code, "line": line, "message": error.message})
        key = f"line:{line}"
        row = error_line(
            self.batch_id, key=key, custom_id=custom_id, code=error.code, message=error.message
        )
        self.spool.write(_jsonl(row))


def _jsonl(row: dict[str, Any]) -> bytes:
    return json.dumps(row, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


@dataclass
class _Sorting:
    """Which task the batch runs (the first line whose task can run sets it) and the tallies."""

    options_for: Callable[[Task], JobOptions]
    requests: int = 0
    accepted: int = 0
    mismatched: int = 0
    reference: Task | None = None
    reference_line: int = 0
    spec: JobSpec | None = None
    warnings: list[str] = field(default_factory=list)
    refused: dict[Task, LineError] = field(default_factory=dict)
    seen: dict[str, int] = field(default_factory=dict)


def create_batch(
    *,
    session: Session,
    storage: Storage,
    settings: Settings,
    tenant_id: uuid.UUID,
    input_file_id: str,
    endpoint: str,
    completion_window: str,
    metadata: dict[str, str] | None,
) -> Batch:
    """Read the input file once, run its classifiable lines as one job, and add the batch row.

    Lines that cannot run are error lines (in S3 at once); a file-level problem gives a `failed`
    batch with `errors` and no job. Raises InvalidInput/NotFound for a bad request.
    """
    if endpoint != ENDPOINT:
        raise InvalidInput(
            f"endpoint {endpoint!r} is not supported; Postroom runs {ENDPOINT} batches",
            details=[{"field": "endpoint"}],
        )
    window = parse_completion_window(completion_window)
    source = find_file(session=session, tenant_id=tenant_id, file_id=input_file_id)
    if source.purpose != PURPOSE_INPUT:
        raise InvalidInput(
            f"file {input_file_id!r} has purpose {source.purpose!r}; the input needs purpose=batch",
            details=[{"field": "input_file_id"}],
        )
    now = datetime.now(UTC)
    batch = Batch(
        id=uuid.uuid4(),
        tenant_id=tenant_id,
        endpoint=endpoint,
        completion_window=completion_window,
        input_file_id=input_file_id,
        status=BatchStatus.validating,
        batch_metadata=metadata,
        created_at=now,
        expires_at=now + timedelta(seconds=window),
    )
    state = _Sorting(options_for=_options_factory(batch.id, window))
    writer = ShardWriter(storage, batch.id)
    intake = new_intake(settings, writer, on_invalid="skip")
    with tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES) as spool:
        errors = _ErrorLines(batch.id, spool, keep=settings.max_error_details)
        try:
            for line, raw in enumerate(_file_lines(storage, input_file_id, settings), start=1):
                if raw is None or raw.strip():
                    _add_line(raw, line, state, intake, errors, session, settings)
                if writer.backlogged:
                    writer.drain()
            intake.finish()
            failure = _file_failure(state, errors)
            if failure is not None:
                writer.discard()
                batch.status, batch.failed_at = BatchStatus.failed, now
                batch.errors = failure + errors.first
            else:
                _start_job(session, storage, settings, batch, state, intake, writer, errors)
        except Exception:
            # Nothing is committed yet: drop the shards this batch wrote, leaving no half job.
            writer.discard()
            raise
    session.add(batch)
    session.flush()
    logger.info(
        "batch %s: %d requests, %d accepted, %d error lines, status %s",
        batch_public_id(batch.id),
        state.requests,
        state.accepted,
        errors.count,
        batch.status,
    )
    return batch


def _options_factory(batch_id: uuid.UUID, window: int) -> Callable[[Task], JobOptions]:
    def options_for(task: Task) -> JobOptions:
        return JobOptions(
            labels=list(task.labels),
            instructions=task.instructions,
            model=task.model,
            deadline=float(window),
            metadata={"batch_id": batch_public_id(batch_id)},
        )

    return options_for


def _file_lines(storage: Storage, file_id: str, settings: Settings) -> Iterator[bytes | None]:
    """The file's lines, cut without buffering more than one line (None: a line over the limit)."""
    body = open_file(storage, file_id)
    splitter = LineSplitter(settings.max_document_bytes)
    try:
        for chunk in body.iter_chunks(1 << 16):
            yield from splitter.feed(chunk)
        yield from splitter.end()
    finally:
        body.close()


def _add_line(
    raw: bytes | None,
    line: int,
    state: _Sorting,
    intake: Intake,
    errors: _ErrorLines,
    session: Session,
    settings: Settings,
) -> None:
    state.requests += 1
    custom_id: str | None = None
    try:
        obj, custom_id = decode_line(raw, line=line, settings=settings)
        request = _sort_request(obj, custom_id, line, state, session, settings)
    except LineError as e:
        errors.add(custom_id=custom_id, line=line, error=e)
        return
    intake.add_object({"id": custom_id, "text": request.text, "metadata": request.metadata(line)})
    state.accepted += 1


def _sort_request(
    obj: dict[str, Any],
    custom_id: str,
    line: int,
    state: _Sorting,
    session: Session,
    settings: Settings,
) -> Request:
    first = state.seen.get(custom_id)
    if first is not None:
        raise LineError(
            "duplicate_custom_id",
            f"line {line}: custom_id {custom_id!r} was already used on line {first}; "
            "custom_ids must be unique within a batch",
        )
    state.seen[custom_id] = line
    request = parse_request(obj, line=line, settings=settings)
    if state.reference is None:
        refused = state.refused.get(request.task) or _prepare(
            request.task, state, session, settings
        )
        if refused is not None:
            raise LineError(refused.code, f"line {line}: {refused.message}")
        state.reference, state.reference_line = request.task, line
    elif request.task != state.reference:
        state.mismatched += 1
        raise LineError(
            "mismatched_classification",
            f"line {line}: its labels, instructions or model differ from the batch's, set by line "
            f"{state.reference_line}; one batch runs one label set and one set of instructions "
            "(put other tasks in their own batch)",
        )
    return request


def _prepare(task: Task, state: _Sorting, session: Session, settings: Settings) -> LineError | None:
    """Check labels and model of the first candidate task (prepare_spec); the error if refused."""
    try:
        options = state.options_for(task)
        state.spec, state.warnings = prepare_spec(options, session=session, settings=settings)
    except InvalidInput as e:
        refused = LineError(e.code, e.message)
    except ValidationError as e:
        refused = LineError("invalid_request", str(e))
    else:
        return None
    if len(state.refused) < 100:  # a file of one bad task refuses it once, not once per line
        state.refused[task] = refused
    return refused


def _start_job(
    session: Session,
    storage: Storage,
    settings: Settings,
    batch: Batch,
    state: _Sorting,
    intake: Intake,
    writer: ShardWriter,
    errors: _ErrorLines,
) -> None:
    """Submit the accepted lines as the batch's job (same id) through postroom.submit."""
    assert state.spec is not None
    assert state.reference is not None
    options = state.options_for(state.reference)
    check_intake(intake, options, settings=settings)
    writer.flush()
    job, _ = finish_submission(
        session=session,
        storage=storage,
        tenant_id=batch.tenant_id,
        job_id=batch.id,
        spec=state.spec,
        warnings=state.warnings,
        options=options,
        intake=intake,
        writer=writer,
        idempotency_key=None,
        body_hash=None,
        settings=settings,
    )
    if errors.count:
        _upload(storage, invalid_lines_key(batch.id), errors.spool)
    batch.job_id = job.id
    batch.model = state.spec.model
    batch.status = BatchStatus.in_progress
    batch.in_progress_at = batch.created_at
    batch.invalid_lines = errors.count
    batch.request_total = state.requests


def _file_failure(state: _Sorting, errors: _ErrorLines) -> list[dict[str, Any]] | None:
    def error(code: str, message: str) -> list[dict[str, Any]]:
        return [{"code": code, "line": None, "message": message}]

    if state.requests == 0:
        return error("empty_file", "the input file has no request lines")
    if state.accepted == 0:
        return error(
            "no_classifiable_lines",
            f"none of the {state.requests} request lines can run as a classification; "
            f"the first {len(errors.first)} problems follow",
        )
    if state.mismatched >= state.accepted:
        return error(
            "mixed_label_sets",
            f"the lines use different label sets or instructions: {state.mismatched} differ from "
            f"line {state.reference_line}'s, which only {state.accepted} share; one batch runs "
            "one classification: split the file into one batch per label set",
        )
    return None


# -- reading, settling and finalizing
def find_batch(*, session: Session, tenant_id: uuid.UUID, batch_id: str) -> Batch:
    try:
        key = uuid.UUID(hex=batch_id.removeprefix("batch_"))
    except ValueError:
        key = None
    row = session.get(Batch, key) if key is not None else None
    if row is None or row.tenant_id != tenant_id:
        raise NotFound(
            f"no batch {batch_id!r}; check the id (batches of other tenants are not visible)"
        )
    return row


def list_batches(
    *, session: Session, tenant_id: uuid.UUID, after: str | None, limit: int
) -> tuple[list[Batch], bool]:
    """The tenant's batches, newest first; `after` is the last id of the previous page."""
    query = select(Batch).where(Batch.tenant_id == tenant_id)
    if after:
        anchor = find_batch(session=session, tenant_id=tenant_id, batch_id=after)
        query = query.where(tuple_(Batch.created_at, Batch.id) < (anchor.created_at, anchor.id))
    rows = list(
        session.scalars(query.order_by(Batch.created_at.desc(), Batch.id.desc()).limit(limit + 1))
    )
    return rows[:limit], len(rows) > limit


@dataclass(frozen=True)
class RequestCounts:
    total: int
    completed: int
    failed: int


def request_counts(*, session: Session, batch: Batch) -> RequestCounts:
    """Frozen at finalization; live from the job's shard counts before."""
    if batch.status in BATCH_ENDED or batch.job_id is None:
        return RequestCounts(batch.request_total, batch.request_completed, batch.request_failed)
    job = session.get_one(Job, batch.job_id)
    counts = job_counts(session=session, job=job)
    return RequestCounts(batch.request_total, counts.succeeded, batch.invalid_lines + counts.failed)


def settle_batch(*, session: Session, batch: Batch) -> bool:
    """Move a batch whose job ended, or whose window passed, to `finalizing` (compare-and-set).

    Returns True when this caller won and must now call finalize_batch (after committing, so no
    lock is held while the files are written). An expired batch's job is cancelled here.
    """
    now = datetime.now(UTC)
    observed = batch.status
    if observed == BatchStatus.finalizing:
        stale = batch.finalizing_at is None or batch.finalizing_at < now - timedelta(
            seconds=FINALIZE_STALE_SECONDS
        )
        # A finalizer that died left it claimed: take the work over (it is idempotent).
        return stale and _claim(session, batch, observed, batch.ending or "", now)
    if observed not in (BatchStatus.in_progress, BatchStatus.cancelling) or batch.job_id is None:
        return False
    job = session.get_one(Job, batch.job_id)
    ending: str | None = None
    if job.status == JobStatus.completed and observed == BatchStatus.in_progress:
        ending = BatchStatus.completed
    elif job.status == JobStatus.failed:
        ending = BatchStatus.failed
    elif observed == BatchStatus.in_progress and now >= batch.expires_at:
        ending = BatchStatus.expired
    elif job.status in (JobStatus.cancelled, JobStatus.completed):
        if _shards_running(session, job.id):
            if observed == BatchStatus.in_progress:  # the job was cancelled through /v1/jobs
                _set_cancelling(session, batch, now)
            return False
        ending = BatchStatus.cancelled
    if ending is None or not _claim(session, batch, observed, ending, now):
        return False
    if ending == BatchStatus.expired:
        cancel_job(session=session, tenant_id=batch.tenant_id, job_id=job.id)
    return True


def _shards_running(session: Session, job_id: uuid.UUID) -> bool:
    """Whether a shard of a cancelled job is still being worked (its results are still to come)."""
    first = session.execute(
        select(Shard.shard_no)
        .where(Shard.job_id == job_id, Shard.state.not_in(SHARD_FINISHED))
        .limit(1)
    ).scalar_one_or_none()
    return first is not None


def _claim(session: Session, batch: Batch, observed: str, ending: str, now: datetime) -> bool:
    where = [Batch.id == batch.id, Batch.status == observed]
    if observed == BatchStatus.finalizing:
        where.append(Batch.finalizing_at.is_not_distinct_from(batch.finalizing_at))
    won = session.execute(
        update(Batch)
        .where(*where)
        .values(status=BatchStatus.finalizing, ending=ending, finalizing_at=now)
        .returning(Batch.id)
    ).scalar_one_or_none()
    session.refresh(batch)
    return won is not None


def _set_cancelling(session: Session, batch: Batch, now: datetime) -> None:
    session.execute(
        update(Batch)
        .where(Batch.id == batch.id, Batch.status == BatchStatus.in_progress)
        .values(status=BatchStatus.cancelling, cancelling_at=now)
    )
    session.refresh(batch)


def cancel_batch(*, session: Session, batch: Batch) -> Batch:
    """Cancel the job (what has not started stops; running shards finish) → `cancelling`."""
    if batch.status in (BatchStatus.cancelling, BatchStatus.cancelled):
        return batch
    if batch.status != BatchStatus.in_progress or batch.job_id is None:
        raise Conflict(
            f"batch {batch_public_id(batch.id)} is {batch.status}; only a batch in progress can "
            "be cancelled",
            details=[{"status": batch.status}],
        )
    cancel_job(session=session, tenant_id=batch.tenant_id, job_id=batch.job_id)
    _set_cancelling(session, batch, datetime.now(UTC))
    return batch


_MISSING = {
    BatchStatus.expired: ("batch_expired", "the batch expired before this request ran"),
    BatchStatus.cancelled: ("batch_cancelled", "the batch was cancelled before this request ran"),
}


def finalize_batch(*, session: Session, storage: Storage, batch: Batch) -> None:
    """Write the output and error files of a batch this caller moved to `finalizing`, then end it.

    Every document of the job gives exactly one line: its result, or an error line (failed,
    cancelled or expired). File ids and S3 keys derive from the batch id, and file rows are
    inserted with ON CONFLICT DO NOTHING, so a second finalizer rewrites rather than duplicates.
    """
    assert batch.job_id is not None
    assert batch.ending is not None
    job = session.get_one(Job, batch.job_id)
    missing_code, missing_message = _MISSING.get(
        BatchStatus(batch.ending), ("not_processed", "no result was recorded for this request")
    )
    done: set[str] = set()
    completed = failed = input_tokens = output_tokens = 0
    with (
        tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES) as out,
        tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES) as err,
    ):
        if batch.invalid_lines:
            body = storage.client.get_object(
                Bucket=storage.bucket, Key=invalid_lines_key(batch.id)
            )["Body"]
            with body:
                for chunk in body.iter_chunks(1 << 16):
                    err.write(chunk)
            failed += batch.invalid_lines
        for shard_no in _shard_numbers(session, job.id):
            docs = [
                d
                for d in storage.iter_jsonl(input_shard_key(job.id, shard_no))
                if str(d["id"]) not in done  # a split shard's documents come again in its children
            ]
            rows = _results(session, job.id, [str(d["id"]) for d in docs])
            for doc in docs:
                custom_id = str(doc["id"])
                done.add(custom_id)
                row = rows.get(custom_id)
                if row is not None and row.error is None:
                    out.write(_jsonl(output_line(batch.id, doc=doc, row=row)))
                    completed += 1
                    input_tokens += row.tokens_in
                    output_tokens += row.tokens_out
                    continue
                code, message = missing_code, missing_message
                # The worker records "cancelled" for documents of a shard it claimed after the
                # job was cancelled: for the batch they did not run, like those with no result.
                if row is not None and row.error != "cancelled":
                    code, message = "classification_failed", str(row.error)
                err.write(
                    _jsonl(
                        error_line(
                            batch.id, key=custom_id, custom_id=custom_id, code=code, message=message
                        )
                    )
                )
                failed += 1
        output_id = _store_file(session, storage, batch, out, output_file_id(batch.id), "output")
        error_id = _store_file(session, storage, batch, err, error_file_id(batch.id), "errors")
    now = datetime.now(UTC)
    stamp = {
        BatchStatus.completed: "completed_at",
        BatchStatus.expired: "expired_at",
        BatchStatus.cancelled: "cancelled_at",
        BatchStatus.failed: "failed_at",
    }[BatchStatus(batch.ending)]
    session.execute(
        update(Batch)
        .where(Batch.id == batch.id, Batch.status == BatchStatus.finalizing)
        .values(
            status=batch.ending,
            output_file_id=output_id,
            error_file_id=error_id,
            request_completed=completed,
            request_failed=failed,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            **{stamp: now},
        )
    )
    session.refresh(batch)
    logger.info(
        "batch %s %s: %d output lines, %d error lines",
        batch_public_id(batch.id),
        batch.status,
        completed,
        failed,
    )


def _shard_numbers(session: Session, job_id: uuid.UUID) -> Sequence[int]:
    return session.scalars(
        select(Shard.shard_no).where(Shard.job_id == job_id).order_by(Shard.shard_no)
    ).all()


def _results(session: Session, job_id: uuid.UUID, doc_ids: list[str]) -> dict[str, Result]:
    if not doc_ids:
        return {}
    rows = session.scalars(
        select(Result).where(Result.job_id == job_id, Result.doc_id.in_(doc_ids))
    )
    return {row.doc_id: row for row in rows}


def _store_file(
    session: Session, storage: Storage, batch: Batch, spool: IO[bytes], file_id: str, kind: str
) -> str | None:
    size = spool.tell()
    if size == 0:
        return None
    _upload(storage, file_key(file_id), spool)
    session.execute(
        insert(File)
        .values(
            id=file_id,
            tenant_id=batch.tenant_id,
            purpose=PURPOSE_OUTPUT,
            filename=f"{batch_public_id(batch.id)}_{kind}.jsonl",
            bytes=size,
            status="processed",
        )
        .on_conflict_do_nothing(index_elements=[File.id])
    )
    return file_id
