"""The purge, a task of `postroom beat`: finish deletions (DELETE /v1/jobs/{id} that found shards
still running, or was cut short) and purge finished jobs past their retention, a few jobs per
tick, each in short transactions (see postroom.deletion). Safe twice: every step deletes what is
still there, and the job row goes last."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from postroom.deletion import jobs_being_deleted, purge_job
from postroom.partitions import drop_partitions_past_retention, ensure_partitions
from postroom.retention import mark_expired_jobs
from postroom.settings import Settings
from postroom.storage import Storage, StorageError

logger = logging.getLogger(__name__)


@dataclass
class PurgeTick:
    partitions_created: int = 0
    partitions_dropped: int = 0
    expired: int = 0
    purged: int = 0
    waiting: int = 0


def purge_tick(
    *, sessions: sessionmaker[Session], storage: Storage, settings: Settings
) -> PurgeTick:
    tick = PurgeTick()
    engine: Engine = sessions.kw["bind"]
    tick.partitions_created = ensure_partitions(engine)
    # Whole days past retention go by partition first: their jobs are then purged with no
    # result rows left to delete.
    tick.partitions_dropped = drop_partitions_past_retention(
        engine, retention_days=settings.retention_days
    )
    with sessions.begin() as session:
        tick.expired = mark_expired_jobs(
            session=session, settings=settings, limit=settings.purge_jobs_per_tick
        )
    with sessions() as session:
        jobs = jobs_being_deleted(session=session, limit=settings.purge_jobs_per_tick)
    for job_id in jobs:
        try:
            report = purge_job(
                sessions,
                storage,
                job_id=job_id,
                batch_rows=settings.delete_batch_rows,
                inbox_prefix=settings.inbox_prefix,
            )
        except StorageError as e:
            logger.warning("purge of job %s left for a later tick: %s", job_id, e)
            continue
        tick.purged += report.done
        tick.waiting += report.waiting > 0
    if tick.expired or tick.purged or tick.partitions_dropped:
        logger.info(
            "purge: %d day partitions dropped, %d more jobs past retention, %d jobs deleted, "
            "%d waiting for running shards",
            tick.partitions_dropped,
            tick.expired,
            tick.purged,
            tick.waiting,
        )
    return tick
