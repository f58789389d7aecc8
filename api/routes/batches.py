"""/v1/batches (OpenAI-compatible): create, retrieve, list, cancel. A batch runs as a job.

Every read settles the batch first: when its job has ended (or its window passed) the reader that
wins the compare-and-set writes the output and error files, then the batch ends. See
postroom.batches.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query
from sqlalchemy.orm import Session

from api.deps import CallerDep, CeleryDep, SessionDep, SettingsDep, StorageDep
from api.routes import files
from api.schemas import ErrorBody
from api.openai.schemas import (
    BatchCreate,
    BatchError,
    BatchErrors,
    BatchList,
    BatchPublic,
    BatchRequestCounts,
    BatchUsage,
)
from postroom import batches
from postroom.db.batch_models import Batch
from postroom.jobs import publish_job
from postroom.storage import Storage

router = APIRouter(prefix="/v1/batches", tags=["openai"])
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (401, 404, 409, 413, 422, 503)
}


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
        id=batches.batch_public_id(batch.id),
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
    won = batches.settle_batch(session=session, batch=batch)
    session.commit()
    if won:
        batches.finalize_batch(session=session, storage=storage, batch=batch)
        session.commit()


@router.post("", responses=ERRORS)
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
    batch = batches.create_batch(
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
    if batch.job_id is not None:
        publish_job(session=session, celery=celery, job_id=batch.job_id)
        session.commit()
    return batch_public(session=session, batch=batch)


@router.get("", responses=ERRORS)
def list_batches(
    caller: CallerDep,
    session: SessionDep,
    storage: StorageDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> BatchList:
    """The tenant's batches, newest first; pass the last id as `after` for the next page."""
    rows, has_more = batches.list_batches(
        session=session, tenant_id=caller.tenant_id, after=after, limit=limit
    )
    for batch in rows:
        _settle(session, storage, batch)
    data = [batch_public(session=session, batch=batch) for batch in rows]
    return BatchList(
        data=data,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
        has_more=has_more,
    )


@router.get("/{batch_id}", responses=ERRORS)
def get_batch(
    batch_id: str, caller: CallerDep, session: SessionDep, storage: StorageDep
) -> BatchPublic:
    """Status, request counts and, once ended, the output and error file ids."""
    batch = batches.find_batch(session=session, tenant_id=caller.tenant_id, batch_id=batch_id)
    _settle(session, storage, batch)
    return batch_public(session=session, batch=batch)


@router.post("/{batch_id}/cancel", responses=ERRORS)
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


# /v1/files and /v1/batches, mounted together by api/main.py (after every route above exists).
openai_router = APIRouter()
openai_router.include_router(files.router)
openai_router.include_router(router)
