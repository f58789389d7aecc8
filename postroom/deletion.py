"""Deleting a job: mark it (it answers 404 from then on, and what has not started is cancelled),
then purge its S3 objects and its result rows, the job row last. A job with a partition of its
own (postroom.partitions) loses its rows with that partition, detached CONCURRENTLY and dropped:
nothing deleted row by row, so the jobs being written meanwhile do not slow down. A smaller
job's rows are deleted in bounded batches.

Safe to repeat and to resume after a crash at any step: the mark is a compare-and-set, every
purge step deletes what is still there, and the job row (with `deleted_at`) stays until the
rest is gone, so the next DELETE or the beat's purge tick finds it and carries on. A shard still
running, or committed but with its S3 result object not yet written, holds the purge back: its
worker would otherwise write an object after the listing.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import and_, delete, func, or_, select, text, update
from sqlalchemy.orm import Session, sessionmaker

from postroom.cancelling import cancel_active_job
from postroom.db.batch_models import File
from postroom.db.inbox_models import InboxObject
from postroom.db.models import Job, Shard
from postroom.domain import JobStatus, ShardState
from postroom.errors import NotFound
from postroom.keys import (
    done_key,
    error_file_id,
    failed_key,
    failed_reason_key,
    file_key,
    job_prefixes,
    outbox_errors_key,
    outbox_parquet_key,
    outbox_results_key,
    output_file_id,
)
from postroom.partitions import drop_job_partition, results_part
from postroom.storage import Storage

logger = logging.getLogger(__name__)

# A committed shard whose S3 object is still unwritten this long is the reaper's to rebuild (its
# worker died); the purge stops waiting for it.
UNWRITTEN_GRACE = timedelta(minutes=2)


@dataclass
class PurgeReport:
    """What one purge did: `done` once the job row is gone; `waiting` shards held it back."""

    done: bool = False
    waiting: int = 0
    objects: int = 0
    rows: int = 0
    partition_dropped: bool = False


def mark_deleted(*, session: Session, tenant_id: uuid.UUID | None, job_id: uuid.UUID) -> int:
    """Start deleting a job: stamp `deleted_at` (once) and cancel it if it is still active.
    Returns the job's document count.

    A job already being deleted is found again, so a repeated DELETE resumes the purge.

    Raises:
        NotFound: no such job for this tenant (or it is gone already).
    """
    row = session.execute(select(Job.tenant_id, Job.total_docs).where(Job.id == job_id)).first()
    if row is None or (tenant_id is not None and row.tenant_id != tenant_id):
        raise NotFound(f"no job {job_id}; check the id (jobs of other tenants are not visible)")
    # Cancel before the stamp: its shard rows are locked before the job row (cancel_active_job).
    cancel_active_job(session=session, job_id=job_id)
    session.execute(
        update(Job).where(Job.id == job_id, Job.deleted_at.is_(None)).values(deleted_at=func.now())
    )
    logger.info("job %s marked for deletion", job_id)
    return int(row.total_docs)


def withdraw_abandoned_uploads(*, session: Session, older_than_seconds: float) -> int:
    """Delete jobs still `validating` long after any upload could still stream into them (the
    API that received them died mid-upload, after shards started: postroom.submit's early
    start); the purge removes their rows and objects. Returns how many were withdrawn."""
    cutoff = func.now() - timedelta(seconds=older_than_seconds)
    stale = session.scalars(
        select(Job.id).where(
            Job.status == JobStatus.validating, Job.created_at < cutoff, Job.deleted_at.is_(None)
        )
    ).all()
    for job_id in stale:
        mark_deleted(session=session, tenant_id=None, job_id=job_id)
        logger.warning(
            "job %s withdrawn: its upload never ended (the API died mid-upload?)", job_id
        )
    return len(stale)


def shards_in_flight(*, session: Session, job_id: uuid.UUID) -> int:
    """Shards of the job a worker may still write for: running on a live lease, or committed
    with the S3 result object not yet written (recently)."""
    now = func.now()
    return int(
        session.execute(
            select(func.count())
            .select_from(Shard)
            .where(
                Shard.job_id == job_id,
                or_(
                    and_(Shard.state == ShardState.running, Shard.lease_until > now),
                    and_(
                        Shard.state == ShardState.done,
                        Shard.results_written_at.is_(None),
                        Shard.finished_at > now - UNWRITTEN_GRACE,
                    ),
                ),
            )
        ).scalar_one()
    )


def delete_objects(storage: Storage, job_id: uuid.UUID) -> int:
    """Every S3 object the job owns: inputs/, results/ (shards, results.parquet, rejected lines),
    batches/ and an OpenAI batch's output and error files. Returns how many were deleted."""
    deleted = 0
    for prefix in job_prefixes(job_id):
        deleted += storage.delete_prefix(prefix)
    for file_id in (output_file_id(job_id), error_file_id(job_id)):
        storage.delete(file_key(file_id))
    return deleted


def drop_folder_outputs(
    *, session: Session, job_id: uuid.UUID, inbox_prefix: str
) -> list[tuple[str, str]]:
    """(bucket, key) of what the drop folder wrote for this job: its outbox results (JSONL or
    Parquet) and errors, and the input moved to done/ or failed/ (with the reason). Left out when
    a later version of the same file was dropped since: those keys are now its outputs."""
    rows = session.scalars(select(InboxObject).where(InboxObject.job_id == job_id)).all()
    found = []
    for row in rows:
        later = session.execute(
            select(InboxObject.id).where(
                InboxObject.bucket == row.bucket,
                InboxObject.key == row.key,
                InboxObject.seen_at > row.seen_at,
            )
        ).first()
        if later is not None:
            continue
        args = (inbox_prefix, row.folder, row.file)
        for key in (
            outbox_results_key(*args),
            outbox_parquet_key(*args),
            outbox_errors_key(*args),
            done_key(*args),
            failed_key(*args),
            failed_reason_key(*args),
        ):
            found.append((row.bucket, key))
    return found


def delete_result_rows(
    *,
    sessions: sessionmaker[Session],
    job_id: uuid.UUID,
    created_at: datetime,
    part: uuid.UUID,
    batch: int,
) -> int:
    """Delete the job's result rows `batch` at a time, each batch in its own short transaction,
    so no lock is held for long and other jobs' writers never wait behind a big delete, resting
    between batches as long as each took. The
    job's creation time and `part` name its partition, so only that one is touched (and ctid,
    unique only within a partition, is safe)."""
    total = 0
    while True:
        started = time.monotonic()
        with sessions.begin() as session:
            deleted: int = session.execute(
                text(
                    "DELETE FROM results WHERE job_id = :job_id AND job_created_at = :created "
                    "AND part = :part AND ctid = ANY(ARRAY(SELECT ctid FROM results "
                    "WHERE job_id = :job_id AND job_created_at = :created AND part = :part "
                    "LIMIT :batch))"
                ),
                {"job_id": job_id, "created": created_at, "part": part, "batch": batch},
            ).rowcount  # type: ignore[attr-defined]
        total += deleted
        if deleted < batch:
            return total
        # Rest as long as the batch took (a 50 % duty cycle), so the purge of a big job leaves
        # Postgres to the jobs being written; deleting is never urgent.
        time.sleep(time.monotonic() - started)


def purge_job(
    sessions: sessionmaker[Session],
    storage: Storage,
    *,
    job_id: uuid.UUID,
    batch_rows: int,
    inbox_prefix: str = "",
) -> PurgeReport:
    """Remove a job marked deleted: objects (the drop folder's outputs and input too, under
    `inbox_prefix`), result rows, shards, its batch's files, its inbox row, the job.

    Raises:
        StorageError: S3 failed; nothing is lost, a later purge carries on.
    """
    report = PurgeReport()
    with sessions() as session:
        job = session.execute(
            select(Job.created_at, Job.own_partition).where(
                Job.id == job_id, Job.deleted_at.is_not(None)
            )
        ).first()
        if job is None:
            report.done = session.get(Job, job_id) is None
            return report
        created_at = job.created_at
        report.waiting = shards_in_flight(session=session, job_id=job_id)
        dropped = drop_folder_outputs(session=session, job_id=job_id, inbox_prefix=inbox_prefix)
    if report.waiting:
        return report
    report.objects = delete_objects(storage, job_id)
    for bucket, key in dropped:
        storage.delete(key, bucket=bucket)
    report.objects += len(dropped)
    part = results_part(job_id, own_partition=job.own_partition)
    if job.own_partition:
        engine = sessions.kw["bind"].engine
        dropped_partition = drop_job_partition(engine, created_at.astimezone(UTC).date(), job_id)
        if dropped_partition is False:  # the table was busy: the next purge tries again
            return report
        report.partition_dropped = bool(dropped_partition)
    # What is left: a small job's rows, or a big job's in a day made before its partitions were
    # split (nothing, once its partition is dropped).
    report.rows = delete_result_rows(
        sessions=sessions, job_id=job_id, created_at=created_at, part=part, batch=batch_rows
    )
    with sessions.begin() as session:
        session.execute(delete(Shard).where(Shard.job_id == job_id))
        session.execute(
            delete(File).where(File.id.in_([output_file_id(job_id), error_file_id(job_id)]))
        )
        session.execute(delete(InboxObject).where(InboxObject.job_id == job_id))
        # The batch row of an OpenAI batch, webhook rows and the rest go with the job (cascade).
        session.execute(delete(Job).where(Job.id == job_id))
    report.done = True
    logger.info(
        "job %s deleted: %d objects, %s, %d result rows deleted",
        job_id,
        report.objects,
        "its partition dropped" if report.partition_dropped else "no partition of its own",
        report.rows,
    )
    return report


def jobs_being_deleted(*, session: Session, limit: int) -> list[uuid.UUID]:
    return list(
        session.scalars(
            select(Job.id).where(Job.deleted_at.is_not(None)).order_by(Job.deleted_at).limit(limit)
        )
    )
