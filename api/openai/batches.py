"""OpenAI batches over jobs: create (request lines → one job), find, list, count, cancel.

A batch is a job with the same id. Its input file's request lines are sorted as they are read
(api.openai.sorting): the classifiable ones go through the one submission path, postroom.submit
(same shards, workers and guarantees), with `custom_id` as the document id, and every other line
becomes an error line at once. When the job ends, a read settles the batch and writes its files
(api.openai.finalize).

Functions take the session and never commit: the route owns the transaction.
"""

from __future__ import annotations

import enum
import logging
import tempfile
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from api.openai.files import CONTENT_TYPE, PURPOSE_INPUT, file_lines, find_file
from api.openai.output import SPOOL_BYTES, ErrorLines
from api.openai.pages import newest_first
from api.openai.requests import ENDPOINT, parse_completion_window
from api.openai.sorting import Sorting, options_factory
from postroom.db.batch_models import Batch
from postroom.db.models import Job
from postroom.errors import Conflict, InvalidInput, NotFound
from postroom.jobs import cancel_job, job_counts
from postroom.keys import batch_public_id, invalid_lines_key
from postroom.settings import Settings
from postroom.storage import Storage
from postroom.submit import Submission

logger = logging.getLogger(__name__)


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
) -> tuple[Batch, Submission]:
    """Read the input file once, run its classifiable lines as one job, and add the batch row.

    Lines that cannot run are error lines (in S3 at once); a file-level problem gives a `failed`
    batch with `errors` and no job. Raises InvalidInput/NotFound for a bad request. The caller
    commits, then publishes the job through the returned submission (a no-op for a failed batch).
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
    # Until the job is recorded, any failure deletes the shards written so far: no half job.
    # on_invalid=reject: a document the intake refuses (say, a lone surrogate) refuses the batch.
    with (
        Submission(storage=storage, settings=settings, on_invalid="reject", job_id=batch.id) as sub,
        tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES) as spool,
    ):
        errors = ErrorLines(batch.id, spool, keep=settings.max_error_details)
        sorting = Sorting(
            submission=sub,
            errors=errors,
            session=session,
            settings=settings,
            options_for=options_factory(batch.id, window),
        )
        lines = file_lines(storage, input_file_id, max_bytes=settings.max_document_bytes)
        for line, raw in enumerate(lines, start=1):
            if raw is None or raw.strip():
                sorting.add_line(raw, line)
        failure = sorting.failure()
        if failure is not None:
            sub.discard()
            batch.status, batch.failed_at = BatchStatus.failed, now
            batch.errors = failure + errors.first
        else:
            _start_job(session, storage, batch, sorting)
    session.add(batch)
    session.flush()
    logger.info(
        "batch %s: %d requests, %d accepted, %d error lines, status %s",
        batch_public_id(batch.id),
        sorting.requests,
        sorting.accepted,
        errors.count,
        batch.status,
    )
    return batch, sub


def _start_job(session: Session, storage: Storage, batch: Batch, sorting: Sorting) -> None:
    """Record the accepted lines as the batch's job (same id), error lines first in S3."""
    sub, errors = sorting.submission, sorting.errors
    sub.seal()
    if errors.count:
        storage.upload_file(invalid_lines_key(batch.id), errors.spool, content_type=CONTENT_TYPE)
    job = sub.record(session=session, tenant_id=batch.tenant_id)
    assert sub.spec is not None
    batch.job_id = job.id
    batch.model = sub.spec.model
    batch.status = BatchStatus.in_progress
    batch.in_progress_at = batch.created_at
    batch.invalid_lines = errors.count
    batch.request_total = sorting.requests


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
    anchor = find_batch(session=session, tenant_id=tenant_id, batch_id=after) if after else None
    return newest_first(session=session, query=query, model=Batch, after=anchor, limit=limit)


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
    set_cancelling(session=session, batch=batch, now=datetime.now(UTC))
    return batch


def set_cancelling(*, session: Session, batch: Batch, now: datetime) -> None:
    """`in_progress` → `cancelling` (compare-and-set: a batch that moved on stays where it is)."""
    session.execute(
        update(Batch)
        .where(Batch.id == batch.id, Batch.status == BatchStatus.in_progress)
        .values(status=BatchStatus.cancelling, cancelling_at=now)
    )
    session.refresh(batch)
