"""The reaper, a task of `postroom beat`: expire dead leases, ring the doorbell again for shards
whose message was lost, and rebuild result objects a worker died before writing.

Postgres is the record, Redis only a doorbell: whatever Redis loses (a restart without persistence,
FLUSHALL, a message popped by a worker that died before recording it), the reaper finds in Postgres
and publishes again. Running it twice, or in two processes at once, only adds duplicate messages,
which the shard claim turns into no-ops.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Any

from redis.exceptions import RedisError
from sqlalchemy.orm import Session, sessionmaker

from postroom.backlog import (
    QueueCount,
    claimable_queues,
    doorbell_counts,
    doorbells_owed,
    shards_to_republish,
    unwritten_result_shards,
)
from postroom.deletion import withdraw_abandoned_uploads
from postroom.domain import QUEUE_SPILL
from postroom.exports import export_finished_jobs
from postroom.jobs import work_order
from postroom.keys import result_shard_key
from postroom.metrics import REAPER_ACTIONS
from postroom.queue import Celery, gpu_queue, publish_and_record, queue_depth, trim_queue
from postroom.results import shard_result_lines
from postroom.settings import Settings
from postroom.shards import expire_leases, mark_results_written
from postroom.storage import Storage, StorageError

logger = logging.getLogger(__name__)


@dataclass
class ReapReport:
    expired: int = 0
    republished: int = 0
    idle_queues: int = 0
    rewritten: int = 0
    exported: int = 0
    trimmed: int = 0
    withdrawn: int = 0


def rewrite_missing_results(
    *, sessions: sessionmaker[Session], storage: Storage, grace_seconds: float
) -> int:
    """Rebuild S3 result objects of done shards from their committed Postgres rows."""
    with sessions() as session:
        missing = unwritten_result_shards(session=session, grace_seconds=grace_seconds)
    for job_id, shard_no in missing:
        with sessions() as session:
            spec = work_order(session=session, job_id=job_id).spec
            lines = shard_result_lines(
                session=session,
                job_id=job_id,
                shard_no=shard_no,
                labels=[label.name for label in spec.labels],
            )
        storage.put_jsonl(result_shard_key(job_id, shard_no), lines)
        with sessions.begin() as session:
            mark_results_written(session=session, job_id=job_id, shard_no=shard_no)
    return len(missing)


def reconcile_doorbells(
    *, sessions: sessionmaker[Session], redis: Any, settings: Settings, report: ReapReport
) -> list[tuple[uuid.UUID, int, str]]:
    """Keep each queue's doorbells (broker messages) matching its claimable shards, both ways:
    a queue holding more drops the excess (when nothing was announced on it within the grace
    period, so no fresh message is mistaken for one), and a queue holding fewer than its settled
    shards gets the missing ones (returned, to publish). Postgres is read before the broker:
    claims in between only shorten the queue, never make a legitimate message look excess."""
    grace = settings.republish_grace_seconds
    with sessions() as session:
        counts = doorbell_counts(session=session, grace_seconds=grace)
    prefix = settings.broker_key_prefix
    known = {QUEUE_SPILL, *(gpu_queue(alias) for alias in settings.models), *counts}
    owed: list[tuple[uuid.UUID, int, str]] = []
    for queue in sorted(known):
        count = counts.get(queue, QueueCount(0, 0, False))
        depth = queue_depth(redis, queue, prefix=prefix)
        if depth > count.claimable and not count.fresh:
            report.trimmed += trim_queue(redis, queue, depth - count.claimable, prefix=prefix)
        elif count.settled > depth:
            with sessions() as session:
                owed += doorbells_owed(
                    session=session, queue=queue, limit=count.settled - depth, grace_seconds=grace
                )
    REAPER_ACTIONS.labels("trimmed").inc(report.trimmed)
    return owed


def reap(
    *,
    sessions: sessionmaker[Session],
    celery: Celery,
    redis: Any,
    storage: Storage,
    settings: Settings,
) -> ReapReport:
    report = ReapReport()
    try:
        report.rewritten = rewrite_missing_results(
            sessions=sessions, storage=storage, grace_seconds=settings.republish_grace_seconds
        )
        report.exported = export_finished_jobs(
            sessions=sessions, storage=storage, settings=settings
        )
    except StorageError as e:
        logger.warning("reaper cannot write result objects yet: %s", e)
    with sessions.begin() as session:
        report.expired = expire_leases(session=session)
        queues = claimable_queues(session=session)
        # An upload ends (or is cut off with 408) within the request deadline; a minute more
        # covers sealing it.
        report.withdrawn = withdraw_abandoned_uploads(
            session=session, older_than_seconds=settings.request_deadline_seconds + 60
        )
    REAPER_ACTIONS.labels("withdrawn").inc(report.withdrawn)
    REAPER_ACTIONS.labels("rewritten").inc(report.rewritten)
    REAPER_ACTIONS.labels("expired").inc(report.expired)
    try:
        prefix = settings.broker_key_prefix
        idle = [q for q in queues if queue_depth(redis, q, prefix=prefix) == 0]
    except RedisError as e:
        logger.warning("reaper cannot read queue depths (%s); skipping republish", e)
        return report
    report.idle_queues = len(idle)
    with sessions() as session:
        candidates = shards_to_republish(
            session=session,
            idle_queues=idle,
            grace_seconds=settings.republish_grace_seconds,
            stale_seconds=settings.republish_stale_seconds,
        )
    try:
        candidates += reconcile_doorbells(
            sessions=sessions, redis=redis, settings=settings, report=report
        )
    except RedisError as e:
        logger.warning("reaper cannot reconcile doorbells (%s)", e)
    candidates = list(dict.fromkeys(candidates))
    # Stops at the first broker error; a shard not rung is a candidate again next tick.
    report.republished = publish_and_record(celery, sessions, candidates)
    REAPER_ACTIONS.labels("republished").inc(report.republished)
    if report.expired or report.republished or report.rewritten or report.trimmed:
        logger.info(
            "reaper: %d leases expired, %d shards republished (%d idle queues), "
            "%d excess doorbells dropped, %d result objects rebuilt",
            report.expired,
            report.republished,
            report.idle_queues,
            report.trimmed,
            report.rewritten,
        )
    return report
