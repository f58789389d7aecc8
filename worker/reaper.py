"""Beat task: expire dead leases and ring the doorbell again for shards whose message was lost.

Postgres is the record, Redis only a doorbell: whatever Redis loses (a restart without persistence,
FLUSHALL, a message popped by a worker that died before recording it), the reaper finds in Postgres
and publishes again. Running it twice, or in two processes at once, only adds duplicate messages,
which the shard claim turns into no-ops.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError
from celery import Celery
from kombu.exceptions import OperationalError as BrokerError
from redis.exceptions import RedisError
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from postroom.db.models import Job, Shard
from postroom.domain import SHARD_CLAIMABLE, JobSpec
from postroom.jobs import (
    expire_leases,
    mark_published,
    mark_results_written,
    shards_to_republish,
    unwritten_result_shards,
)
from postroom.keys import result_shard_key
from postroom.metrics import REAPER_ACTIONS
from postroom.queue import publish_shard, queue_depth
from postroom.results import shard_result_lines
from postroom.settings import Settings
from postroom.storage import Storage

logger = logging.getLogger(__name__)


@dataclass
class ReapReport:
    expired: int = 0
    republished: int = 0
    idle_queues: int = 0
    rewritten: int = 0


def rewrite_missing_results(
    *, sessions: sessionmaker[Session], storage: Storage, grace_seconds: float
) -> int:
    """Rebuild S3 result objects of done shards from their committed Postgres rows."""
    with sessions() as session:
        missing = unwritten_result_shards(session=session, grace_seconds=grace_seconds)
    for job_id, shard_no in missing:
        with sessions() as session:
            spec = JobSpec.model_validate(session.get_one(Job, job_id).spec)
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
    except (BotoCoreError, ClientError) as e:
        logger.warning("reaper cannot write result objects yet: %s", e)
    with sessions.begin() as session:
        report.expired = expire_leases(session=session)
        queues = session.scalars(
            select(Shard.queue).distinct().where(Shard.state.in_(SHARD_CLAIMABLE))
        ).all()
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
    published: list[tuple[Any, int]] = []
    try:
        for job_id, shard_no, queue in candidates:
            publish_shard(celery, job_id=str(job_id), shard_no=shard_no, queue=queue)
            published.append((job_id, shard_no))
    except (BrokerError, RedisError, OSError) as e:
        logger.warning("reaper stopped publishing after %d shards: %s", len(published), e)
    if published:
        with sessions.begin() as session:
            mark_published(session=session, shards=published)
    report.republished = len(published)
    REAPER_ACTIONS.labels("republished").inc(report.republished)
    if report.expired or report.republished or report.rewritten:
        logger.info(
            "reaper: %d leases expired, %d shards republished (%d idle queues), "
            "%d result objects rebuilt",
            report.expired,
            report.republished,
            report.idle_queues,
            report.rewritten,
        )
    return report
