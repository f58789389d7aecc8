"""/v1/jobs: create (inline or `input_uri`), upload (streamed JSONL), list, get, results (JSONL,
CSV, Parquet), cancel, delete. Every way in builds one `Submission`, feeds it, records it, commits
and publishes."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Literal

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from api.deps import CallerDep, CeleryDep, SessionDep, SettingsDep, StorageDep
from api.input_uri import input_location, read_object
from api.job_view import job_public
from api.pages import decode_cursor, encode_cursor
from api.request_body import RawBody, check_options
from api.responses import error_responses
from api.schemas import JobCreate, JobList, JobPublic
from api.uploads import body_source, upload_options
from postroom.db.models import Job
from postroom.deletion import mark_deleted, purge_job
from postroom.errors import InvalidInput, PayloadTooLarge, Unavailable
from postroom.job_options import JobOptions
from postroom.jobs import cancel_job, find_job
from postroom.keys import body_hash
from postroom.queue import Celery
from postroom.result_formats import MEDIA_TYPES, encode_results
from postroom.results import iter_result_lines
from postroom.settings import Settings
from postroom.storage import Storage, StorageError
from postroom.submit import Submission

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
ERRORS = error_responses(401, 404, 408, 409, 413, 415, 422, 503)
# DELETE purges inline up to this many row batches (POSTROOM_DELETE_BATCH_ROWS each); a bigger
# job answers 202 and the beat's purge removes it, so the request stays short.
INLINE_DELETE_BATCHES = 20
IdempotencyKey = Annotated[
    str | None, Header(alias="Idempotency-Key", max_length=200, description="dedupe key")
]


@dataclass(frozen=True)
class Edge:
    """What a way in hands to `_submit` besides the submission: its caller and its response."""

    celery: Celery
    tenant_id: uuid.UUID
    idempotency_key: str | None
    response: Response
    settings: Settings


def _submit(submission: Submission, digest: str, edge: Edge, *, session: Session) -> JobPublic:
    """Record → commit → publish → commit, the same for every way in: 201 for a new job, 200
    for an idempotent repeat (the same key and body)."""
    job = submission.record(
        session=session,
        tenant_id=edge.tenant_id,
        idempotency_key=edge.idempotency_key,
        body_hash=digest,
    )
    session.commit()
    if submission.publish(session=session, celery=edge.celery):
        session.commit()
    edge.response.status_code = 201 if submission.created else 200
    return job_public(session=session, job=job, settings=edge.settings)


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
    _check_sources(body, settings=settings)
    location = input_location(body.input_uri, settings=settings) if body.input_uri else None
    etag = b""
    with Submission.start(body, session=session, storage=storage, settings=settings) as sub:
        if location is not None:
            bucket, key = location
            etag = read_object(
                storage, bucket, key, uri=body.input_uri or "", submission=sub, settings=settings
            ).encode()
        else:
            # The documents as parsed by raw_body, where duplicate keys and NaN are still visible.
            documents = raw.get("documents") if isinstance(raw, dict) else None
            for doc in documents if isinstance(documents, list) else body.documents or []:
                sub.add(doc)
        sub.seal()
    edge = Edge(celery, caller.tenant_id, idempotency_key, response, settings)
    # Hashed once the documents passed (they may hold what JSON cannot encode); for input_uri the
    # object's ETag too: the same URI with new content is a different request.
    digest = body_hash(body.model_dump_json().encode(), *([etag] if location else []))
    return _submit(sub, digest, edge, session=session)


def _check_sources(body: JobCreate, *, settings: Settings) -> None:
    """Exactly one of `documents` (within the inline limit) and `input_uri`."""
    if body.input_uri is not None and body.documents is not None:
        raise InvalidInput(
            "send either `documents` or `input_uri`, not both",
            details=[{"field": "input_uri"}, {"field": "documents"}],
        )
    if body.input_uri is None and body.documents is None:
        raise InvalidInput(
            "no documents: send `documents` inline, `input_uri`, or stream JSONL to "
            "POST /v1/jobs/upload",
            details=[{"field": "documents"}],
        )
    if body.documents is not None and len(body.documents) > settings.max_inline_documents:
        raise PayloadTooLarge(
            f"{len(body.documents):,} inline documents; the limit is "
            f"{settings.max_inline_documents:,} (POSTROOM_MAX_INLINE_DOCUMENTS): "
            "stream them to POST /v1/jobs/upload instead",
            details=[{"field": "documents"}],
        )


@router.post("/upload", status_code=201, responses=ERRORS)
async def upload_job(
    request: Request,
    caller: CallerDep,
    settings: SettingsDep,
    storage: StorageDep,
    celery: CeleryDep,
    response: Response,
    labels: Annotated[
        str, Query(description="a,b,c or a JSON list of names/{name,description?,examples?}")
    ],
    instructions: str | None = None,
    mode: Literal["generative", "embedding"] | None = None,
    model: str | None = None,
    decoding: Literal["score", "choice"] = "score",
    spill: Literal["auto", "never", "always"] = "auto",
    deadline: str | None = None,
    on_invalid: Literal["reject", "skip"] = "reject",
    metadata: Annotated[str | None, Query(description="a JSON object")] = None,
    max_spill_cost: Annotated[float | None, Query(ge=0, description="$ cap on spill")] = None,
    webhook_url: Annotated[str | None, Query(description="target of the job's events")] = None,
    expires_after: Annotated[int | None, Query(gt=0, description="purge N s after end")] = None,
    priority: Literal["high", "normal", "low"] = "normal",
    label_template: Annotated[
        str | None, Query(description="embedding mode: how a bare label is phrased, with {name}")
    ] = None,
    cascade: Annotated[
        str | None, Query(description='a JSON object: {"below": 0.7, "model": "spill", …}')
    ] = None,
    idempotency_key: IdempotencyKey = None,
) -> JobPublic:
    """Create a job from a streamed JSONL body (`application/x-ndjson`) or a multipart `file`.

    Lines are validated and written to S3 a shard at a time; the file is never held in memory.
    A gzip body (`Content-Encoding: gzip`, or a multipart file named `*.jsonl.gz`) is
    decompressed as it streams, within POSTROOM_MAX_UPLOAD_BYTES and POSTROOM_MAX_GZIP_RATIO.
    A body that stalls or drags past the read deadlines gets 408; a refused upload leaves no job
    and no shards behind.
    """
    options = upload_options(
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
        webhook_url,
        expires_after,
        priority,
        label_template,
        cascade,
    )
    check_options(options.model_dump(), settings=settings)
    sessions: sessionmaker[Session] = request.app.state.sessions
    sub = await run_in_threadpool(_start, sessions, options, storage, settings)
    hasher = hashlib.sha256(options.model_dump_json().encode())
    edge = Edge(celery, caller.tenant_id, idempotency_key, response, settings)

    def finish() -> JobPublic:
        with sessions() as session:
            return _submit(sub, hasher.hexdigest(), edge, session=session)

    # Shards run as they land in S3 (the job is `validating` until the body ends), except for
    # a request with an Idempotency-Key: its repeat must find the job before anything runs.
    # Leaving the block with an error (bad lines, too big, too slow, the client went away)
    # deletes what this upload wrote, or withdraws the job it started, so no half job is left.
    if idempotency_key is None:
        length = request.headers.get("content-length", "")
        sub.start_early(
            sessions=sessions,
            celery=celery,
            tenant_id=caller.tenant_id,
            body_bytes=int(length) if length.isdigit() else None,
        )
    async with sub:
        chunks, gzip, name = await body_source(request)
        sub.open_stream(gzip=gzip, name=name)
        async for chunk in chunks:
            hasher.update(chunk)
            sub.feed(chunk, wait=False)
            if sub.backlogged:
                await run_in_threadpool(sub.drain)
        await run_in_threadpool(sub.seal)
        return await run_in_threadpool(finish)


def _start(
    sessions: sessionmaker[Session], options: JobOptions, storage: Storage, settings: Settings
) -> Submission:
    with sessions() as session:
        return Submission.start(options, session=session, storage=storage, settings=settings)


@router.get("", responses=ERRORS)
def list_jobs(
    caller: CallerDep,
    session: SessionDep,
    settings: SettingsDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: str | None = None,
) -> JobList:
    """The tenant's jobs, newest first."""
    query = select(Job).where(Job.tenant_id == caller.tenant_id, Job.deleted_at.is_(None))
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
    responses={
        **ERRORS,
        200: {"content": {media: {} for media in MEDIA_TYPES.values()}},
    },
    response_class=StreamingResponse,
)
def get_results(
    job_id: uuid.UUID,
    request: Request,
    caller: CallerDep,
    session: SessionDep,
    settings: SettingsDep,
    only: Literal["failed"] | None = None,
    format: Literal["jsonl", "csv", "parquet"] = "jsonl",
) -> StreamingResponse:
    """The job's results in input order: NDJSON lines `{id, label, confidence, route, model,
    revision, error, distribution}` (default), or `format=csv|parquet` with the columns id,
    label, confidence, route, model, revision, error and `prob_<label>` per label. Streamed:
    Parquet a row group at a time, never the whole job in memory."""
    job = find_job(session=session, tenant_id=caller.tenant_id, job_id=job_id)
    labels = [label["name"] for label in job.spec["labels"]]
    sessions = request.app.state.sessions

    def chunks() -> Iterator[bytes]:
        with sessions() as stream_session:
            lines = iter_result_lines(
                session=stream_session, job_id=job_id, only_failed=only == "failed"
            )
            yield from encode_results(
                lines, format=format, labels=labels, row_group=settings.results_parquet_row_group
            )

    suffix = {"jsonl": "jsonl", "csv": "csv", "parquet": "parquet"}[format]
    return StreamingResponse(
        chunks(),
        media_type=MEDIA_TYPES[format],
        headers={"Content-Disposition": f'attachment; filename="{job_id}.{suffix}"'},
    )


@router.post("/{job_id}/cancel", responses=ERRORS)
def cancel(
    job_id: uuid.UUID, caller: CallerDep, session: SessionDep, settings: SettingsDep
) -> JobPublic:
    """Stop what has not started; finished results stay."""
    job = cancel_job(session=session, tenant_id=caller.tenant_id, job_id=job_id)
    session.commit()
    return job_public(session=session, job=job, settings=settings)


@router.delete(
    "/{job_id}",
    status_code=204,
    responses={**ERRORS, 202: {"description": "deletion under way: shards were still running"}},
)
def delete_job(
    job_id: uuid.UUID,
    request: Request,
    caller: CallerDep,
    session: SessionDep,
    storage: StorageDep,
    settings: SettingsDep,
) -> Response:
    """Delete a job: cancel what has not started, then remove its result rows, shards and every
    S3 object it owns (inputs, results, results.parquet). From now on it answers 404.

    204 when it is gone; 202 when shards were still running, or the job is large (over 20
    batches of POSTROOM_DELETE_BATCH_ROWS): the beat's purge finishes it. Repeating it resumes a
    deletion that was cut short."""
    docs = mark_deleted(session=session, tenant_id=caller.tenant_id, job_id=job_id)
    session.commit()
    if docs > INLINE_DELETE_BATCHES * settings.delete_batch_rows:
        return _deleting(job_id, "it is large: the beat's purge removes it in the background")
    try:
        report = purge_job(
            request.app.state.sessions,
            storage,
            job_id=job_id,
            batch_rows=settings.delete_batch_rows,
            inbox_prefix=settings.inbox_prefix,
        )
    except StorageError as e:
        raise Unavailable(
            f"S3 failed while deleting job {job_id}'s objects ({e}); the job is hidden already "
            "and the deletion resumes when you repeat the request (or in the beat)"
        ) from e
    if report.done:
        return Response(status_code=204)
    if not report.waiting:
        return _deleting(job_id, "its results partition was busy; the beat's purge finishes it")
    return _deleting(
        job_id, f"{report.waiting} shard(s) were still running; the beat finishes once they stop"
    )


def _deleting(job_id: uuid.UUID, why: str) -> JSONResponse:
    return JSONResponse(
        status_code=202,
        content={
            "id": str(job_id),
            "status": "deleting",
            "message": f"job {job_id} is hidden; {why}",
        },
    )
