"""The reaper keeps each queue's doorbells matching its claimable shards, both ways, against real
Postgres and Redis: a queue holding fewer gets the missing ones (suspects named first), a queue
holding more, with nothing fresh on it, drops the excess."""

from __future__ import annotations

import uuid
from datetime import timedelta

import redis
from sqlalchemy import func, update
from sqlalchemy.orm import Session, sessionmaker

from control.reaper import ReapReport, reconcile_doorbells
from postroom.db.models import Job, Shard
from postroom.queue import Celery, publish_shard, queue_depth
from postroom.settings import Settings
from tests.postroom.jobrows import make_job


def test_doorbells_are_reconciled_both_ways(
    sessions: sessionmaker[Session], settings: Settings, celery: Celery, broker: redis.Redis
) -> None:
    queue = f"gpu.r{uuid.uuid4().hex[:10]}"
    prefix = settings.broker_key_prefix
    job_id = make_job(sessions, sizes=(3, 3, 3, 3), queue=queue)
    # Announced long ago; shard 2 crashed a worker once (a suspect: only its own doorbell
    # claims it).
    with sessions.begin() as session:
        session.execute(
            update(Shard)
            .where(Shard.job_id == job_id)
            .values(enqueued_at=func.now() - timedelta(hours=1))
        )
        session.execute(
            update(Shard)
            .where(Shard.job_id == job_id, Shard.shard_no == 2)
            .values(state="expired", attempt=1)
        )

    def reconcile() -> list[tuple[uuid.UUID, int, str]]:
        report = ReapReport()
        owed = reconcile_doorbells(
            sessions=sessions, redis=broker, settings=settings, report=report
        )
        return [o for o in owed if o[2] == queue]

    # Given fewer doorbells than shards (Redis lost two of four), the two missing are owed,
    # the suspect named first.
    for shard_no in (0, 1):
        publish_shard(celery, job_id=str(job_id), shard_no=shard_no, queue=queue)
    owed = reconcile()
    assert len(owed) == 2
    assert owed[0] == (job_id, 2, queue)
    assert queue_depth(broker, queue, prefix=prefix) == 2

    # Given more doorbells than shards, the excess is dropped down to one per shard.
    for _ in range(5):
        publish_shard(celery, job_id=str(job_id), shard_no=0, queue=queue)
    assert queue_depth(broker, queue, prefix=prefix) == 7
    assert reconcile() == []
    assert queue_depth(broker, queue, prefix=prefix) == 4

    # Shards finished meanwhile leave their doorbells in excess: dropped too.
    with sessions.begin() as session:
        session.execute(
            update(Shard).where(Shard.job_id == job_id, Shard.shard_no > 0).values(state="done")
        )
    assert reconcile() == []
    assert queue_depth(broker, queue, prefix=prefix) == 1
    with sessions.begin() as session:
        session.execute(update(Job).where(Job.id == job_id).values(status="cancelled"))
    broker.delete(prefix + queue)
