"""/v1/jobs: create (inline), upload (streamed JSONL), list, get, results (NDJSON), cancel."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from botocore.exceptions import BotoCoreError, ClientError
from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import ValidationError
from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from api.deps import CallerDep, CeleryDep, SessionDep, SettingsDep, StorageDep
from api.schemas import ErrorBody, JobCounts, JobCreate, JobList, JobPublic
from postroom.costs import spend
from postroom.db.models import Job
from postroom.domain import JobSpec
from postroom.errors import (
    InputUriNotAllowed,
    InvalidInput,
    PayloadTooLarge,
    Unavailable,
    UnsupportedMediaType,
)
from postroom.intake import Intake, LineStream, json_problem, parse_json, show
from postroom.jobs import cancel_job, find_job, job_counts, publish_job, spend_by_route
from postroom.keys import body_hash, drop_area
from postroom.results import iter_result_lines
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
from postroom.tenants import Caller

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (401, 404, 408, 409, 413, 415, 422, 503)
}
GZIP_ENCODINGS = frozenset({"gzip", "x-gzip"})
GZIP_TYPES = frozenset({"application/gzip", "application/x-gzip"})
# Where Postroom keeps its own objects: `input_uri` may not read them (another tenant's inputs).
OWN_PREFIXES = ("inputs/", "results/", "files/", "batches/")
CHUNK_BYTES = 1 << 16
IdempotencyKey = Annotated[
    str | None, Header(alias="Idempotency-Key", max_length=200, description="dedupe key")
]


def job_public(*, session: Session, job: Job, settings: Settings) -> JobPublic:
    spec = JobSpec.model_validate(job.spec)
    counts = job_counts(session=session, job=job)
    rate: float | None = None
    eta: float | None = None
    if job.started_at is not None:
        end = job.finished_at or datetime.now(UTC)
        elapsed = (end - job.started_at).total_seconds()
        done = counts.succeeded + counts.failed - job.rejected_docs
        if elapsed > 0 and done > 0:
            rate = round(done / elapsed, 2)
            eta = round(counts.pending / rate, 1) if job.finished_at is None else 0.0
    return JobPublic(
        id=job.id,
        status=job.status,
        mode=spec.mode,
        model=spec.model,
        revision=spec.revision,
        decoding=spec.decoding,
        labels=spec.labels,
        spill=job.spill,
        deadline=job.deadline,
        metadata=job.job_metadata,
        counts=JobCounts(**counts.__dict__),
        shards=job.shard_count,
        warnings=list(job.warnings or []),
        error=job.error,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        rate_docs_per_second=rate,
        eta_seconds=eta,
        max_spill_cost=job.max_spill_cost,
        estimate=job.estimate,
        spend=spend(settings, spend_by_route(session=session, job_id=job.id)),
        router_note=job.router_note,
        results_url=f"/v1/jobs/{job.id}/results",
    )


def _submitted(
    *,
    session: Session,
    celery: Any,
    job: Job,
    created: bool,
    response: Response,
    settings: Settings,
) -> JobPublic:
    session.commit()
    if created:
        publish_job(session=session, celery=celery, job_id=job.id)
        session.commit()
    response.status_code = 201 if created else 200
    return job_public(session=session, job=job, settings=settings)


async def _raw_body(request: Request, settings: SettingsDep) -> Any:
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


RawBody = Annotated[Any, Depends(_raw_body)]


@router.post("", status_code=201, responses=ERRORS)
def create_job(
    body: JobCreate,
    raw: RawBody,
    caller: CallerDep,
    session: SessionDep,
    storage: StorageDep,
    celery: CeleryDep,
    settings: SettingsDep,
    response: Response,
    idempotency_key: IdempotencyKey = None,
) -> JobPublic:
    """Create a job with inline documents (up to POSTROOM_MAX_INLINE_DOCUMENTS), or from a JSONL
    (or .jsonl.gz) object named by `input_uri` (`s3://<allowed bucket>/<key>`)."""
    if body.input_uri is not None and body.documents is not None:
        raise InvalidInput(
            "send either `documents` or `input_uri`, not both",
            details=[{"field": "input_uri"}, {"field": "documents"}],
        )
    if body.input_uri is not None:
        return _create_from_uri(
            body, caller, session, storage, celery, settings, response, idempotency_key
        )
    if body.documents is None:
        raise InvalidInput(
            "no documents: send `documents` inline, `input_uri`, or stream JSONL to "
            "POST /v1/jobs/upload",
            details=[{"field": "documents"}],
        )
    if len(body.documents) > settings.max_inline_documents:
        raise PayloadTooLarge(
            f"{len(body.documents):,} inline documents; the limit is "
            f"{settings.max_inline_documents:,} (POSTROOM_MAX_INLINE_DOCUMENTS): "
            "stream them to POST /v1/jobs/upload instead",
            details=[{"field": "documents"}],
        )
    spec, warnings = prepare_spec(body, session=session, settings=settings)
    job_id = uuid.uuid4()
    writer = ShardWriter(storage, job_id)
    intake = new_intake(settings, writer, on_invalid=body.on_invalid)
    # The documents as parsed by _raw_body, where duplicate keys and NaN are still visible.
    documents = raw.get("documents") if isinstance(raw, dict) else None
    for doc in documents if isinstance(documents, list) else body.documents:
        intake.add_object(doc)
    intake.finish()
    check_intake(intake, body, settings=settings)
    writer.flush()
    job, created = finish_submission(
        session=session,
        storage=storage,
        tenant_id=caller.tenant_id,
        job_id=job_id,
        spec=spec,
        warnings=warnings,
        options=body,
        intake=intake,
        writer=writer,
        idempotency_key=idempotency_key,
        body_hash=body_hash(body.model_dump_json().encode()),
        settings=settings,
    )
    return _submitted(
        session=session,
        celery=celery,
        job=job,
        created=created,
        response=response,
        settings=settings,
    )


def _create_from_uri(
    body: JobCreate,
    caller: Caller,
    session: Session,
    storage: Storage,
    celery: Any,
    settings: Settings,
    response: Response,
    idempotency_key: str | None,
) -> JobPublic:
    """`input_uri`: the object is streamed through the same intake as an upload, a chunk at a
    time, and the job is refused (with what this request wrote deleted) on any error."""
    assert body.input_uri is not None
    bucket, key = input_location(body.input_uri, settings=settings)
    spec, warnings = prepare_spec(body, session=session, settings=settings)
    job_id = uuid.uuid4()
    writer = ShardWriter(storage, job_id)
    intake = new_intake(settings, writer, on_invalid=body.on_invalid)
    try:
        etag = _read_object(storage, bucket, key, uri=body.input_uri, intake=intake, writer=writer)
        intake.finish()
        check_intake(intake, body, settings=settings)
        writer.flush()
    except Exception:
        writer.discard()
        raise
    job, created = finish_submission(
        session=session,
        storage=storage,
        tenant_id=caller.tenant_id,
        job_id=job_id,
        spec=spec,
        warnings=warnings,
        options=body,
        intake=intake,
        writer=writer,
        idempotency_key=idempotency_key,
        # The object's ETag too: the same URI with new content is a different request.
        body_hash=body_hash(body.model_dump_json().encode(), etag.encode()),
        settings=settings,
    )
    return _submitted(
        session=session,
        celery=celery,
        job=job,
        created=created,
        response=response,
        settings=settings,
    )


def input_location(uri: str, *, settings: Settings) -> tuple[str, str]:
    """(bucket, key) of an `input_uri`, if the deployment lets jobs read it: only the buckets of
    POSTROOM_INPUT_URI_BUCKETS (default: POSTROOM_S3_BUCKET), and never Postroom's own objects
    there (other jobs' inputs and results, batch files, the drop folder)."""
    allowed = settings.input_buckets()
    where = " or ".join(f"s3://{b}/" for b in allowed)
    if not uri.startswith("s3://"):
        raise InvalidInput(
            f"input_uri: must look like s3://<bucket>/<key>.jsonl, in {where}",
            details=[{"field": "input_uri", "reason": "not an s3:// URI", "allowed": allowed}],
        )
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if bucket not in allowed:
        raise InputUriNotAllowed(
            f"input_uri: bucket {show(bucket, 63)!r} is not allowed here; put the file in "
            f"{where} (POSTROOM_INPUT_URI_BUCKETS)",
            details=[{"field": "input_uri", "reason": "bucket not allowed", "allowed": allowed}],
        )
    if not key or key.endswith("/"):
        raise InvalidInput(
            "input_uri: names no object; give the key of one .jsonl or .jsonl.gz file",
            details=[{"field": "input_uri", "reason": "no key"}],
        )
    if bucket in (settings.s3_bucket, settings.inbox_bucket or settings.s3_bucket):
        areas = ("inbox", "outbox", "done", "failed")
        own = (*OWN_PREFIXES, *(drop_area(settings.inbox_prefix, area) for area in areas))
        hit = next((prefix for prefix in own if key.startswith(prefix)), None)
        if hit is not None:
            raise InputUriNotAllowed(
                f"input_uri: {hit} holds Postroom's own objects and cannot be read as input; "
                "put your file elsewhere in the bucket",
                details=[{"field": "input_uri", "reason": f"under {hit}"}],
            )
    return bucket, key


def _read_object(
    storage: Storage, bucket: str, key: str, *, uri: str, intake: Intake, writer: ShardWriter
) -> str:
    """Stream one S3 object (gunzipped when .gz) into the intake; returns its ETag."""
    settings = intake.settings
    name = show(uri, 200)
    try:
        obj = storage.client.get_object(Bucket=bucket, Key=key)
    except ClientError as e:
        status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 500))
        code = str(e.response.get("Error", {}).get("Code", status))
        if status >= 500:
            raise Unavailable(f"S3 could not serve {name} ({code}); retry later") from e
        raise InvalidInput(
            f"input_uri: cannot read {name} ({code}); check the bucket and the key, and that "
            "Postroom's S3 credentials may read it",
            details=[{"field": "input_uri", "reason": code}],
        ) from e
    except BotoCoreError as e:
        raise Unavailable(f"S3 could not serve {name} ({e.__class__.__name__}); retry later") from e
    if int(obj.get("ContentLength", 0)) > settings.max_upload_bytes:
        obj["Body"].close()
        raise PayloadTooLarge(
            f"{name} is over {settings.max_upload_bytes:,} bytes (POSTROOM_MAX_UPLOAD_BYTES); "
            "split it into smaller files",
            details=[{"field": "input_uri", "reason": "object over the limit"}],
        )
    gzip = key.endswith(".gz") or obj.get("ContentEncoding", "") in GZIP_ENCODINGS
    stream = LineStream(intake, gzip=gzip, name=name)
    body = obj["Body"]
    try:
        for chunk in body.iter_chunks(CHUNK_BYTES):
            stream.feed(chunk)
            writer.drain()
        stream.end()
    except (BotoCoreError, ClientError) as e:
        raise Unavailable(f"reading {name} from S3 failed ({e.__class__.__name__}); retry") from e
    finally:
        body.close()
    return str(obj.get("ETag", ""))


def _upload_options(
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
) -> JobOptions:
    raw: dict[str, Any] = {
        "labels": _json_or_csv(labels, "labels"),
        "instructions": instructions,
        "mode": mode,
        "model": model,
        "decoding": decoding,
        "spill": spill,
        "on_invalid": on_invalid,
        "max_spill_cost": max_spill_cost,
    }
    if deadline is not None:
        raw["deadline"] = float(deadline) if _is_number(deadline) else deadline
    if metadata is not None:
        raw["metadata"] = _json_or_csv(metadata, "metadata")
    try:
        return JobOptions.model_validate(raw)
    except ValidationError as e:
        details = [
            {"field": ".".join(str(p) for p in err["loc"]), "reason": err["msg"]}
            for err in e.errors()
        ]
        raise InvalidInput(f"{details[0]['field']}: {details[0]['reason']}", details=details) from e


def _json_or_csv(value: str, field: str) -> Any:
    text = value.strip()
    if text.startswith(("[", "{")):
        try:
            return json.loads(text)
        except ValueError as e:
            raise InvalidInput(f"{field} is not valid JSON: {e}", details=[{"field": field}]) from e
    return [part.strip() for part in text.split(",")]


def _is_number(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True


async def _body_source(request: Request) -> tuple[AsyncIterator[bytes], bool, str]:
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
        return _file_chunks(upload), gzip, f"file {show(filename, 100)!r}"
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in (*GZIP_ENCODINGS, "identity", ""):
        raise UnsupportedMediaType(
            f"Content-Encoding {show(encoding)!r} is not supported; send gzip or uncompressed",
            details=[{"field": "Content-Encoding"}],
        )
    gzip = encoding in GZIP_ENCODINGS or content_type in GZIP_TYPES
    return request.stream(), gzip, "the request body"


async def _file_chunks(upload: UploadFile) -> AsyncIterator[bytes]:
    while chunk := await upload.read(CHUNK_BYTES):
        yield chunk


@router.post("/upload", status_code=201, responses=ERRORS)
async def upload_job(
    request: Request,
    caller: CallerDep,
    settings: SettingsDep,
    storage: StorageDep,
    celery: CeleryDep,
    response: Response,
    labels: Annotated[str, Query(description="a,b,c or a JSON list of names/{name,description}")],
    instructions: str | None = None,
    mode: Literal["generative", "embedding"] | None = None,
    model: str | None = None,
    decoding: Literal["score", "choice"] = "score",
    spill: Literal["auto", "never", "always"] = "auto",
    deadline: str | None = None,
    on_invalid: Literal["reject", "skip"] = "reject",
    metadata: Annotated[str | None, Query(description="a JSON object")] = None,
    max_spill_cost: Annotated[float | None, Query(ge=0, description="$ cap on spill")] = None,
    idempotency_key: IdempotencyKey = None,
) -> JobPublic:
    """Create a job from a streamed JSONL body (`application/x-ndjson`) or a multipart `file`.

    Lines are validated and written to S3 a shard at a time; the file is never held in memory.
    A gzip body (`Content-Encoding: gzip`, or a multipart file named `*.jsonl.gz`) is
    decompressed as it streams, within POSTROOM_MAX_UPLOAD_BYTES and POSTROOM_MAX_GZIP_RATIO.
    A body that stalls or drags past the read deadlines gets 408; a refused upload leaves no job
    and no shards behind.
    """
    options = _upload_options(
        labels,
        instructions,
        mode,
        model,
        decoding,
        spill,
        deadline,
        on_invalid,
        metadata,
        max_spill_cost,
    )
    check_options(options.model_dump(), settings=settings)
    sessions = request.app.state.sessions
    spec, warnings = await run_in_threadpool(_prepare, sessions, options, settings)
    job_id = uuid.uuid4()
    writer = ShardWriter(storage, job_id)
    intake = new_intake(settings, writer, on_invalid=options.on_invalid)
    hasher = hashlib.sha256(options.model_dump_json().encode())
    try:
        chunks, gzip, name = await _body_source(request)
        stream = LineStream(intake, gzip=gzip, name=name)
        async for chunk in chunks:
            hasher.update(chunk)
            stream.feed(chunk)
            if writer.backlogged:
                await run_in_threadpool(writer.drain)
        stream.end()
        intake.finish()
        check_intake(intake, options, settings=settings)
        await run_in_threadpool(writer.flush)
    except Exception:
        # Nothing committed yet (bad lines, too big, too slow, the client went away): drop what
        # this upload wrote, so no half job is left behind.
        await run_in_threadpool(writer.discard)
        raise
    return await run_in_threadpool(
        _finish_upload,
        sessions,
        storage,
        celery,
        caller,
        job_id,
        spec,
        warnings,
        options,
        intake,
        writer,
        idempotency_key,
        hasher.hexdigest(),
        response,
        settings,
    )


def _prepare(sessions: Any, options: JobOptions, settings: Settings) -> tuple[JobSpec, list[str]]:
    with sessions() as session:
        return prepare_spec(options, session=session, settings=settings)


def _finish_upload(
    sessions: Any,
    storage: Storage,
    celery: Any,
    caller: Caller,
    job_id: uuid.UUID,
    spec: JobSpec,
    warnings: list[str],
    options: JobOptions,
    intake: Intake,
    writer: ShardWriter,
    idempotency_key: str | None,
    digest: str,
    response: Response,
    settings: Settings,
) -> JobPublic:
    with sessions() as session:
        job, created = finish_submission(
            session=session,
            storage=storage,
            tenant_id=caller.tenant_id,
            job_id=job_id,
            spec=spec,
            warnings=warnings,
            options=options,
            intake=intake,
            writer=writer,
            idempotency_key=idempotency_key,
            body_hash=digest,
            settings=settings,
        )
        return _submitted(
            session=session,
            celery=celery,
            job=job,
            created=created,
            response=response,
            settings=settings,
        )


def encode_cursor(created_at: datetime, row_id: uuid.UUID) -> str:
    """An opaque page cursor: the (created_at, id) of the last row of the page."""
    raw = f"{created_at.isoformat()}|{row_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        created, _, row_id = raw.partition("|")
        when = datetime.fromisoformat(created)
        if when.tzinfo is None:
            raise ValueError("cursor time without a timezone")
        return when, uuid.UUID(row_id)
    except (ValueError, binascii.Error, UnicodeDecodeError) as e:
        raise InvalidInput(
            "cursor is not valid; pass the `next_cursor` of the previous page unchanged",
            details=[{"field": "cursor"}],
        ) from e


@router.get("", responses=ERRORS)
def list_jobs(
    caller: CallerDep,
    session: SessionDep,
    settings: SettingsDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: str | None = None,
) -> JobList:
    """The tenant's jobs, newest first."""
    query = select(Job).where(Job.tenant_id == caller.tenant_id)
    if cursor:
        created, job_id = decode_cursor(cursor)
        query = query.where(
            or_(Job.created_at < created, and_(Job.created_at == created, Job.id < job_id))
        )
    jobs = session.scalars(query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1))
    rows = list(jobs)
    last = rows[limit - 1] if len(rows) > limit else None
    next_cursor = encode_cursor(last.created_at, last.id) if last else None
    return JobList(
        data=[job_public(session=session, job=job, settings=settings) for job in rows[:limit]],
        next_cursor=next_cursor,
    )


@router.get("/{job_id}", responses=ERRORS)
def get_job(
    job_id: uuid.UUID, caller: CallerDep, session: SessionDep, settings: SettingsDep
) -> JobPublic:
    """Status, counts, rate and ETA of one job."""
    job = find_job(session=session, tenant_id=caller.tenant_id, job_id=job_id)
    return job_public(session=session, job=job, settings=settings)


@router.get(
    "/{job_id}/results",
    responses={**ERRORS, 200: {"content": {"application/x-ndjson": {}}}},
    response_class=StreamingResponse,
)
def get_results(
    job_id: uuid.UUID,
    request: Request,
    caller: CallerDep,
    session: SessionDep,
    only: Literal["failed"] | None = None,
) -> StreamingResponse:
    """One NDJSON line per document: `{id, label, confidence, route, model, error}`."""
    find_job(session=session, tenant_id=caller.tenant_id, job_id=job_id)
    sessions = request.app.state.sessions

    def lines() -> Iterator[bytes]:
        with sessions() as stream_session:
            batch: list[str] = []
            for line in iter_result_lines(
                session=stream_session, job_id=job_id, only_failed=only == "failed"
            ):
                batch.append(json.dumps(line, ensure_ascii=False))
                if len(batch) >= 500:
                    yield ("\n".join(batch) + "\n").encode()
                    batch.clear()
            if batch:
                yield ("\n".join(batch) + "\n").encode()

    return StreamingResponse(lines(), media_type="application/x-ndjson")


@router.post("/{job_id}/cancel", responses=ERRORS)
def cancel(
    job_id: uuid.UUID, caller: CallerDep, session: SessionDep, settings: SettingsDep
) -> JobPublic:
    """Stop what has not started; finished results stay."""
    job = cancel_job(session=session, tenant_id=caller.tenant_id, job_id=job_id)
    session.commit()
    return job_public(session=session, job=job, settings=settings)
