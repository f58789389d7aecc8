"""/v1/jobs: create (inline), upload (streamed JSONL), list, get, results (NDJSON), cancel."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import ValidationError
from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect

from api.deps import CallerDep, CeleryDep, SessionDep, SettingsDep, StorageDep
from api.schemas import ErrorBody, JobCounts, JobCreate, JobList, JobPublic
from postroom.db.models import Job
from postroom.domain import JobSpec
from postroom.errors import InvalidInput, PayloadTooLarge
from postroom.intake import Intake, LineSplitter, feed_lines
from postroom.jobs import cancel_job, find_job, job_counts, publish_job
from postroom.keys import body_hash
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
    code: {"model": ErrorBody} for code in (401, 404, 409, 413, 422, 503)
}
IdempotencyKey = Annotated[
    str | None, Header(alias="Idempotency-Key", max_length=200, description="dedupe key")
]


def job_public(*, session: Session, job: Job) -> JobPublic:
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
        results_url=f"/v1/jobs/{job.id}/results",
    )


def _submitted(
    *, session: Session, celery: Any, job: Job, created: bool, response: Response
) -> JobPublic:
    session.commit()
    if created:
        publish_job(session=session, celery=celery, job_id=job.id)
        session.commit()
    response.status_code = 201 if created else 200
    return job_public(session=session, job=job)


@router.post("", status_code=201, responses=ERRORS)
def create_job(
    body: JobCreate,
    caller: CallerDep,
    session: SessionDep,
    storage: StorageDep,
    celery: CeleryDep,
    settings: SettingsDep,
    response: Response,
    idempotency_key: IdempotencyKey = None,
) -> JobPublic:
    """Create a job with inline documents (up to POSTROOM_MAX_INLINE_DOCUMENTS)."""
    if body.input_uri is not None:
        raise InvalidInput(
            "input_uri is not supported yet; stream the file to POST /v1/jobs/upload",
            details=[{"field": "input_uri"}],
        )
    if body.documents is None:
        raise InvalidInput(
            "no documents: send `documents` inline or stream JSONL to POST /v1/jobs/upload",
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
    intake = new_intake(settings, writer)
    for doc in body.documents:
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
    )
    return _submitted(session=session, celery=celery, job=job, created=created, response=response)


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
) -> JobOptions:
    raw: dict[str, Any] = {
        "labels": _json_or_csv(labels, "labels"),
        "instructions": instructions,
        "mode": mode,
        "model": model,
        "decoding": decoding,
        "spill": spill,
        "on_invalid": on_invalid,
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


async def _body_chunks(request: Request) -> AsyncIterator[bytes]:
    """The JSONL bytes of an upload: the raw body, or the `file` part of a multipart form."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        form = await request.form()
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise InvalidInput(
                "multipart upload needs a file part named `file`", details=[{"field": "file"}]
            )
        while chunk := await upload.read(1 << 16):
            yield chunk
        return
    async for chunk in request.stream():
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
    idempotency_key: IdempotencyKey = None,
) -> JobPublic:
    """Create a job from a streamed JSONL body (`application/x-ndjson`) or a multipart `file`.

    Lines are validated and written to S3 a shard at a time; the file is never held in memory.
    """
    options = _upload_options(
        labels, instructions, mode, model, decoding, spill, deadline, on_invalid, metadata
    )
    sessions = request.app.state.sessions
    spec, warnings = await run_in_threadpool(_prepare, sessions, options, settings)
    job_id = uuid.uuid4()
    writer = ShardWriter(storage, job_id)
    intake = new_intake(settings, writer)
    splitter = LineSplitter(settings.max_document_bytes)
    hasher = hashlib.sha256(options.model_dump_json().encode())
    try:
        async for chunk in _body_chunks(request):
            hasher.update(chunk)
            feed_lines(intake, splitter.feed(chunk))
            if writer.pending:
                await run_in_threadpool(writer.flush)
        feed_lines(intake, splitter.end())
        intake.finish()
        check_intake(intake, options, settings=settings)
        await run_in_threadpool(writer.flush)
    except (ClientDisconnect, InvalidInput):
        # Nothing committed yet: drop what this upload wrote, so no half job is left behind.
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
        )
        return _submitted(
            session=session, celery=celery, job=job, created=created, response=response
        )


def _encode_cursor(job: Job) -> str:
    raw = f"{job.created_at.isoformat()}|{job.id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        created, _, job_id = raw.partition("|")
        return datetime.fromisoformat(created), uuid.UUID(job_id)
    except (ValueError, binascii.Error, UnicodeDecodeError) as e:
        raise InvalidInput(
            "cursor is not valid; pass the `next_cursor` of the previous page unchanged",
            details=[{"field": "cursor"}],
        ) from e


@router.get("", responses=ERRORS)
def list_jobs(
    caller: CallerDep,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: str | None = None,
) -> JobList:
    """The tenant's jobs, newest first."""
    query = select(Job).where(Job.tenant_id == caller.tenant_id)
    if cursor:
        created, job_id = _decode_cursor(cursor)
        query = query.where(
            or_(Job.created_at < created, and_(Job.created_at == created, Job.id < job_id))
        )
    jobs = session.scalars(query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1))
    rows = list(jobs)
    next_cursor = _encode_cursor(rows[limit - 1]) if len(rows) > limit else None
    return JobList(
        data=[job_public(session=session, job=job) for job in rows[:limit]],
        next_cursor=next_cursor,
    )


@router.get("/{job_id}", responses=ERRORS)
def get_job(job_id: uuid.UUID, caller: CallerDep, session: SessionDep) -> JobPublic:
    """Status, counts, rate and ETA of one job."""
    job = find_job(session=session, tenant_id=caller.tenant_id, job_id=job_id)
    return job_public(session=session, job=job)


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
def cancel(job_id: uuid.UUID, caller: CallerDep, session: SessionDep) -> JobPublic:
    """Stop what has not started; finished results stay."""
    job = cancel_job(session=session, tenant_id=caller.tenant_id, job_id=job_id)
    session.commit()
    return job_public(session=session, job=job)
