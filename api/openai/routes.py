"""/v1/files and /v1/batches (OpenAI-compatible): the routes the official `openai` SDK calls.

Files: upload batch input, read, download content, delete. Batches: create, retrieve, list,
cancel; a batch runs as a job. Every read of a batch settles it first: when its job has ended (or
its window passed) the reader that wins the compare-and-set writes the output and error files, then
the batch ends (api.openai.finalize).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Form, Query, UploadFile
from fastapi.responses import StreamingResponse
from sqlalchemy.orm import Session

from api.deps import CallerDep, CeleryDep, SessionDep, SettingsDep, StorageDep
from api.openai import batches, files, finalize
from api.openai.schemas import (
    BatchCreate,
    BatchError,
    BatchErrors,
    BatchList,
    BatchPublic,
    BatchRequestCounts,
    BatchUsage,
    FileDeleted,
    FileList,
    FilePublic,
)
from api.responses import error_responses
from postroom.db.batch_models import Batch, File
from postroom.keys import batch_public_id
from postroom.storage import Storage

files_router = APIRouter(prefix="/v1/files", tags=["openai"])
batches_router = APIRouter(prefix="/v1/batches", tags=["openai"])
FILE_ERRORS = error_responses(401, 404, 413, 422, 503)
BATCH_ERRORS = error_responses(401, 404, 409, 413, 422, 503)
Limit = Annotated[int, Query(ge=1, le=100)]


def file_public(row: File) -> FilePublic:
    return FilePublic(
        id=row.id,
        bytes=row.bytes,
        created_at=int(row.created_at.timestamp()),
        filename=row.filename,
        purpose=row.purpose,
        status=row.status,
    )


@files_router.post("", responses=FILE_ERRORS)
def create_file(
    file: UploadFile,
    purpose: Annotated[str, Form(description="batch")],
    caller: CallerDep,
    session: SessionDep,
    storage: StorageDep,
) -> FilePublic:
    """Upload a JSONL batch input (multipart `file` + `purpose=batch`), streamed to S3.

    The multipart parser spools the upload to a temporary file (disk past 1 MiB) and S3 receives it
    in parts: the file is never held whole in memory.
    """
    row = files.create_file(
        session=session,
        storage=storage,
        tenant_id=caller.tenant_id,
        fileobj=file.file,
        filename=file.filename or "upload.jsonl",
        purpose=purpose,
    )
    session.commit()
    return file_public(row)


@files_router.get("", responses=FILE_ERRORS)
def list_files(
    caller: CallerDep,
    session: SessionDep,
    purpose: str | None = None,
    after: str | None = None,
    limit: Limit = 20,
) -> FileList:
    """The tenant's files, newest first; pass the last id as `after` for the next page."""
    rows, has_more = files.list_files(
        session=session, tenant_id=caller.tenant_id, purpose=purpose, after=after, limit=limit
    )
    return FileList.of([file_public(row) for row in rows], has_more=has_more)


@files_router.get("/{file_id}", responses=FILE_ERRORS)
def get_file(file_id: str, caller: CallerDep, session: SessionDep) -> FilePublic:
    row = files.find_file(session=session, tenant_id=caller.tenant_id, file_id=file_id)
    return file_public(row)


@files_router.get(
    "/{file_id}/content",
    responses={**FILE_ERRORS, 200: {"content": {files.CONTENT_TYPE: {}}}},
    response_class=StreamingResponse,
)
def get_file_content(
    file_id: str, caller: CallerDep, session: SessionDep, storage: StorageDep
) -> StreamingResponse:
    """The file's bytes, streamed from S3."""
    row = files.find_file(session=session, tenant_id=caller.tenant_id, file_id=file_id)
    body = files.open_file(storage, row.id)

    def chunks() -> Iterator[bytes]:
        with body:
            yield from body.chunks(files.CHUNK_BYTES)

    return StreamingResponse(chunks(), media_type=files.CONTENT_TYPE)


@files_router.delete("/{file_id}", responses=FILE_ERRORS)
def delete_file(
    file_id: str, caller: CallerDep, session: SessionDep, storage: StorageDep
) -> FileDeleted:
    files.delete_file(session=session, storage=storage, tenant_id=caller.tenant_id, file_id=file_id)
    session.commit()
    return FileDeleted(id=file_id, deleted=True)


def _unix(value: datetime | None) -> int | None:
    return int(value.timestamp()) if value is not None else None


def batch_public(*, session: Session, batch: Batch) -> BatchPublic:
    counts = batches.request_counts(session=session, batch=batch)
    usage = None
    if batch.status in batches.BATCH_ENDED and batch.job_id is not None:
        usage = BatchUsage(
            input_tokens=batch.input_tokens,
            output_tokens=batch.output_tokens,
            total_tokens=batch.input_tokens + batch.output_tokens,
        )
    return BatchPublic(
        id=batch_public_id(batch.id),
        endpoint=batch.endpoint,
        model=batch.model,
        errors=BatchErrors(data=[BatchError(**e) for e in batch.errors]) if batch.errors else None,
        input_file_id=batch.input_file_id,
        completion_window=batch.completion_window,
        status=batch.status,
        output_file_id=batch.output_file_id,
        error_file_id=batch.error_file_id,
        created_at=int(batch.created_at.timestamp()),
        in_progress_at=_unix(batch.in_progress_at),
        expires_at=_unix(batch.expires_at),
        finalizing_at=_unix(batch.finalizing_at),
        completed_at=_unix(batch.completed_at),
        failed_at=_unix(batch.failed_at),
        expired_at=_unix(batch.expired_at),
        cancelling_at=_unix(batch.cancelling_at),
        cancelled_at=_unix(batch.cancelled_at),
        request_counts=BatchRequestCounts(
            total=counts.total, completed=counts.completed, failed=counts.failed
        ),
        usage=usage,
        metadata=batch.batch_metadata,
    )


def _settle(session: Session, storage: Storage, batch: Batch) -> None:
    """End the batch if its job has; the winner of the claim writes the files (after a commit,
    so no row lock is held while they are written)."""
    won = finalize.settle_batch(session=session, batch=batch)
    session.commit()
    if won:
        finalize.finalize_batch(session=session, storage=storage, batch=batch)
        session.commit()


@batches_router.post("", responses=BATCH_ERRORS)
def create_batch(
    body: BatchCreate,
    caller: CallerDep,
    session: SessionDep,
    storage: StorageDep,
    celery: CeleryDep,
    settings: SettingsDep,
) -> BatchPublic:
    """Create a batch from an uploaded file; it runs as one Postroom job (`completion_window` is
    its deadline). A file-level problem gives a `failed` batch with `errors`, as OpenAI does."""
    batch, submission = batches.create_batch(
        session=session,
        storage=storage,
        settings=settings,
        tenant_id=caller.tenant_id,
        input_file_id=body.input_file_id,
        endpoint=body.endpoint,
        completion_window=body.completion_window,
        metadata=body.metadata,
    )
    session.commit()
    if submission.created:
        submission.publish(session=session, celery=celery)
        session.commit()
    return batch_public(session=session, batch=batch)


@batches_router.get("", responses=BATCH_ERRORS)
def list_batches(
    caller: CallerDep,
    session: SessionDep,
    storage: StorageDep,
    after: str | None = None,
    limit: Limit = 20,
) -> BatchList:
    """The tenant's batches, newest first; pass the last id as `after` for the next page."""
    rows, has_more = batches.list_batches(
        session=session, tenant_id=caller.tenant_id, after=after, limit=limit
    )
    for batch in rows:
        _settle(session, storage, batch)
    return BatchList.of([batch_public(session=session, batch=b) for b in rows], has_more=has_more)


@batches_router.get("/{batch_id}", responses=BATCH_ERRORS)
def get_batch(
    batch_id: str, caller: CallerDep, session: SessionDep, storage: StorageDep
) -> BatchPublic:
    """Status, request counts and, once ended, the output and error file ids."""
    batch = batches.find_batch(session=session, tenant_id=caller.tenant_id, batch_id=batch_id)
    _settle(session, storage, batch)
    return batch_public(session=session, batch=batch)


@batches_router.post("/{batch_id}/cancel", responses=BATCH_ERRORS)
def cancel_batch(
    batch_id: str, caller: CallerDep, session: SessionDep, storage: StorageDep
) -> BatchPublic:
    """Stop what has not started (`cancelling`); it ends `cancelled` with the finished requests
    in its output file and the others as `batch_cancelled` error lines."""
    batch = batches.find_batch(session=session, tenant_id=caller.tenant_id, batch_id=batch_id)
    _settle(session, storage, batch)
    batches.cancel_batch(session=session, batch=batch)
    session.commit()
    return batch_public(session=session, batch=batch)


# /v1/files and /v1/batches, mounted together by api/main.py.
router = APIRouter()
router.include_router(files_router)
router.include_router(batches_router)
