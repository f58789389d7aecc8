"""Ending a batch: settle (its job ended or its window passed → `finalizing`, compare-and-set, so
one reader wins), then finalize (write the output and error files, then the final status).

File ids and S3 keys derive from the batch id: a second finalizer rewrites the same objects and
rows, never new ones. Functions take the session and never commit: the route owns the transaction.
"""

from __future__ import annotations

import logging
import tempfile
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import IO

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from api.openai.batches import BatchStatus, set_cancelling
from api.openai.files import CHUNK_BYTES, store_output_file
from api.openai.output import SPOOL_BYTES, error_line, jsonl, output_line
from postroom.db.batch_models import Batch
from postroom.db.models import Job, Result, Shard
from postroom.domain import SHARD_FINISHED, JobStatus
from postroom.jobs import cancel_job
from postroom.keys import (
    batch_public_id,
    error_file_id,
    input_shard_key,
    invalid_lines_key,
    output_file_id,
)
from postroom.results import of_job
from postroom.storage import Storage
from postroom.webhooks import enqueue_batch_event

logger = logging.getLogger(__name__)

# A candidate for a setting (POSTROOM_BATCH_*): how long a `finalizing` batch may stay claimed
# before another reader takes the work over.
FINALIZE_STALE_SECONDS = 600
# The error of a request with no result, by how the batch ended.
_MISSING = {
    BatchStatus.expired: ("batch_expired", "the batch expired before this request ran"),
    BatchStatus.cancelled: ("batch_cancelled", "the batch was cancelled before this request ran"),
}
_NOT_PROCESSED = ("not_processed", "no result was recorded for this request")
_STAMPS = {
    BatchStatus.completed: "completed_at",
    BatchStatus.expired: "expired_at",
    BatchStatus.cancelled: "cancelled_at",
    BatchStatus.failed: "failed_at",
}


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
                set_cancelling(session=session, batch=batch, now=now)
            return False
        ending = BatchStatus.cancelled
    if ending is None or not _claim(session, batch, observed, ending, now):
        return False
    if ending == BatchStatus.expired:
        cancel_job(session=session, tenant_id=batch.tenant_id, job_id=job.id, event="job.expired")
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


@dataclass
class _Tally:
    completed: int = 0
    failed: int = 0
    input_tokens: int = 0
    output_tokens: int = 0


def finalize_batch(*, session: Session, storage: Storage, batch: Batch) -> None:
    """Write the output and error files of a batch this caller moved to `finalizing`, then end it.

    Every document of the job gives exactly one line: its result, or an error line (failed,
    cancelled or expired). File ids and S3 keys derive from the batch id, and file rows are
    inserted with ON CONFLICT DO NOTHING, so a second finalizer rewrites rather than duplicates.
    """
    assert batch.job_id is not None
    assert batch.ending is not None
    tally = _Tally()
    with (
        tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES) as out,
        tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES) as err,
    ):
        if batch.invalid_lines:
            with storage.open(invalid_lines_key(batch.id)) as invalid:
                for chunk in invalid.chunks(CHUNK_BYTES):
                    err.write(chunk)
            tally.failed += batch.invalid_lines
        _write_job_lines(session, storage, batch, out, err, tally)
        output_id = _store(session, storage, batch, out, output_file_id(batch.id), "output")
        error_id = _store(session, storage, batch, err, error_file_id(batch.id), "errors")
    _end(session, batch, output_id, error_id, tally)
    logger.info(
        "batch %s %s: %d output lines, %d error lines",
        batch_public_id(batch.id),
        batch.status,
        tally.completed,
        tally.failed,
    )


def _write_job_lines(
    session: Session, storage: Storage, batch: Batch, out: IO[bytes], err: IO[bytes], tally: _Tally
) -> None:
    """One line per document of the job, shard by shard: output if it has a result, else error."""
    assert batch.job_id is not None
    assert batch.ending is not None
    job_id = batch.job_id
    missing_code, missing_message = _MISSING.get(BatchStatus(batch.ending), _NOT_PROCESSED)
    done: set[str] = set()
    for shard_no in _shard_numbers(session, job_id):
        docs = [
            d
            for d in storage.iter_jsonl(input_shard_key(job_id, shard_no))
            if str(d["id"]) not in done  # a split shard's documents come again in its children
        ]
        rows = _results(session, job_id, [str(d["id"]) for d in docs])
        for doc in docs:
            custom_id = str(doc["id"])
            done.add(custom_id)
            row = rows.get(custom_id)
            if row is not None and row.error is None:
                out.write(jsonl(output_line(batch.id, doc=doc, row=row)))
                tally.completed += 1
                tally.input_tokens += row.tokens_in
                tally.output_tokens += row.tokens_out
                continue
            code, message = missing_code, missing_message
            # The worker records "cancelled" for documents of a shard it claimed after the
            # job was cancelled: for the batch they did not run, like those with no result.
            if row is not None and row.error != "cancelled":
                code, message = "classification_failed", str(row.error)
            line = error_line(
                batch.id, key=custom_id, custom_id=custom_id, code=code, message=message
            )
            err.write(jsonl(line))
            tally.failed += 1


def _end(
    session: Session, batch: Batch, output_id: str | None, error_id: str | None, tally: _Tally
) -> None:
    """`finalizing` → the ending it was claimed for, with the files and the frozen counts."""
    assert batch.ending is not None
    stamp = _STAMPS[BatchStatus(batch.ending)]
    session.execute(
        update(Batch)
        .where(Batch.id == batch.id, Batch.status == BatchStatus.finalizing)
        .values(
            status=batch.ending,
            output_file_id=output_id,
            error_file_id=error_id,
            request_completed=tally.completed,
            request_failed=tally.failed,
            input_tokens=tally.input_tokens,
            output_tokens=tally.output_tokens,
            **{stamp: datetime.now(UTC)},
        )
    )
    if batch.job_id is not None:
        enqueue_batch_event(
            session=session,
            job_id=batch.job_id,
            tenant_id=batch.tenant_id,
            event=f"batch.{batch.ending}",
            batch=batch_public_id(batch.id),
        )
    session.refresh(batch)


def _store(
    session: Session, storage: Storage, batch: Batch, spool: IO[bytes], file_id: str, kind: str
) -> str | None:
    return store_output_file(
        session=session,
        storage=storage,
        tenant_id=batch.tenant_id,
        file_id=file_id,
        filename=f"{batch_public_id(batch.id)}_{kind}.jsonl",
        spool=spool,
    )


def _shard_numbers(session: Session, job_id: uuid.UUID) -> Sequence[int]:
    return session.scalars(
        select(Shard.shard_no).where(Shard.job_id == job_id).order_by(Shard.shard_no)
    ).all()


def _results(session: Session, job_id: uuid.UUID, doc_ids: list[str]) -> dict[str, Result]:
    if not doc_ids:
        return {}
    rows = session.scalars(
        select(Result).where(*of_job(session=session, job_id=job_id), Result.doc_id.in_(doc_ids))
    )
    return {row.doc_id: row for row in rows}
