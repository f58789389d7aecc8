"""Result files written to S3: a finished job's `results/{job}/results.parquet`, and any format of
a job's results spooled (memory, then a temporary file) for an upload."""

from __future__ import annotations

import logging
import tempfile
import uuid
from typing import IO

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from postroom.db.models import Job
from postroom.domain import JobSpec, JobStatus
from postroom.keys import results_parquet_key
from postroom.result_formats import MEDIA_TYPES, ResultFormat, encode_results
from postroom.results import iter_result_lines
from postroom.settings import Settings
from postroom.storage import Storage

logger = logging.getLogger(__name__)

SPOOL_BYTES = 8 * 1024 * 1024  # past this a spooled file moves from memory to disk


def job_labels(*, session: Session, job_id: uuid.UUID) -> list[str]:
    spec = session.execute(select(Job.spec).where(Job.id == job_id)).scalar_one()
    return [label.name for label in JobSpec.model_validate(spec).labels]


def spool_results(
    sessions: sessionmaker[Session],
    *,
    job_id: uuid.UUID,
    format: ResultFormat,
    row_group: int,
    only_failed: bool = False,
) -> tuple[IO[bytes], int]:
    """The job's results in `format`, in a spooled temporary file (the caller closes it), and
    how many bytes it holds."""
    spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)  # noqa: SIM115 - caller closes
    with sessions() as session:
        labels = job_labels(session=session, job_id=job_id)
        lines = iter_result_lines(session=session, job_id=job_id, only_failed=only_failed)
        for chunk in encode_results(lines, format=format, labels=labels, row_group=row_group):
            spool.write(chunk)
    size = spool.tell()
    spool.seek(0)
    return spool, size


def export_job_parquet(
    sessions: sessionmaker[Session], storage: Storage, *, job_id: uuid.UUID, settings: Settings
) -> None:
    """Write results/{job}/results.parquet and mark the job exported. Safe twice: the key is
    derived from the job id and overwritten."""
    spool, _ = spool_results(
        sessions, job_id=job_id, format="parquet", row_group=settings.results_parquet_row_group
    )
    with spool:
        storage.upload_file(results_parquet_key(job_id), spool, content_type=MEDIA_TYPES["parquet"])
    with sessions.begin() as session:
        marked = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.deleted_at.is_(None))
            .values(results_exported_at=func.now())
            .returning(Job.id)
        ).scalar_one_or_none()
    if marked is None:  # deleted while this was written: do not leave the object behind
        storage.delete(results_parquet_key(job_id))


def unexported_jobs(*, session: Session, limit: int) -> list[uuid.UUID]:
    return list(
        session.scalars(
            select(Job.id)
            .where(
                Job.status == JobStatus.completed,
                Job.results_exported_at.is_(None),
                Job.deleted_at.is_(None),
            )
            .order_by(Job.finished_at)
            .limit(limit)
        )
    )


def export_finished_jobs(
    *, sessions: sessionmaker[Session], storage: Storage, settings: Settings
) -> int:
    """The reaper's step: write results.parquet for completed jobs that lack it."""
    with sessions() as session:
        jobs = unexported_jobs(session=session, limit=settings.results_export_jobs_per_tick)
    for job_id in jobs:
        export_job_parquet(sessions, storage, job_id=job_id, settings=settings)
        logger.info("job %s: results.parquet written", job_id)
    return len(jobs)
