"""Retention: the beat's purge removes finished jobs past POSTROOM_RETENTION_DAYS or their own
`expires_after`, a bounded number per tick, and nothing else (active, recent, not yet due)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from control.purge import purge_tick
from postroom.db.models import Job, Result
from postroom.partitions import existing_partitions
from postroom.settings import Settings
from postroom.storage import Storage
from tests.finished_jobs import finished_job
from tests.postroom.jobrows import make_job


def _age(
    sessions: sessionmaker[Session], job_id: uuid.UUID, finished: timedelta, **values: object
) -> None:
    with sessions.begin() as session:
        session.execute(
            update(Job).where(Job.id == job_id).values(finished_at=func.now() - finished, **values)
        )


def _left(sessions: sessionmaker[Session], jobs: dict[str, uuid.UUID]) -> set[str]:
    with sessions() as session:
        found = set(session.scalars(select(Job.id).where(Job.id.in_(jobs.values()))))
    return {name for name, job_id in jobs.items() if job_id in found}


def test_only_jobs_past_their_time_are_purged_a_bounded_batch_per_tick(
    private_db: tuple[sessionmaker[Session], Settings], storage: Storage
) -> None:
    sessions, settings = private_db  # the purge works across every tenant
    tenant = f"keep-{uuid.uuid4().hex[:8]}"
    jobs = {
        name: finished_job(sessions, tenant=tenant, docs=20, shard_size=10, storage=storage)
        for name in ("old", "recent", "own_due", "own_not_due")
    }
    jobs["active_old"] = make_job(sessions, sizes=(3,), tenant=tenant)
    _age(sessions, jobs["old"], timedelta(days=8))
    _age(sessions, jobs["recent"], timedelta(days=6))
    _age(sessions, jobs["own_due"], timedelta(minutes=2), expires_after=60)
    _age(sessions, jobs["own_not_due"], timedelta(days=30), expires_after=90 * 86400)
    with sessions.begin() as session:  # running for 30 days, never finished
        session.execute(
            update(Job)
            .where(Job.id == jobs["active_old"])
            .values(created_at=func.now() - timedelta(days=30))
        )
    keep_week = settings.model_copy(update={"retention_days": 7, "purge_jobs_per_tick": 1})

    first = purge_tick(sessions=sessions, storage=storage, settings=keep_week)
    assert (first.expired, first.purged) == (1, 1)
    assert len(_left(sessions, jobs)) == 4
    purge_tick(sessions=sessions, storage=storage, settings=keep_week)
    assert _left(sessions, jobs) == {"recent", "own_not_due", "active_old"}
    for name in ("old", "own_due"):
        page, _ = storage.list_page(f"results/{jobs[name]}/")
        assert page == []
    with sessions() as session:
        kept = session.execute(
            select(func.count()).select_from(Result).where(Result.job_id == jobs["recent"])
        ).scalar_one()
    assert kept == 20

    # A whole day past retention goes by dropping its partition
    old_day = finished_job(
        sessions, tenant=tenant, docs=50, shard_size=25, storage=storage, created_days_ago=40
    )
    _age(sessions, old_day, timedelta(days=39))
    day = (datetime.now(UTC) - timedelta(days=40)).date()
    with sessions() as session:
        assert day in existing_partitions(session.connection())
    tick = purge_tick(sessions=sessions, storage=storage, settings=keep_week)
    assert tick.partitions_dropped == 1
    assert _left(sessions, {"old_day": old_day}) == set()
    with sessions() as session:
        assert day not in existing_partitions(session.connection())
    assert storage.list_page(f"inputs/{old_day}/")[0] == []
    assert _left(sessions, jobs) == {"recent", "own_not_due", "active_old"}

    # With retention off (0 days) only a job's own expires_after counts
    _age(sessions, jobs["recent"], timedelta(days=3650))
    forever = settings.model_copy(update={"retention_days": 0, "purge_jobs_per_tick": 100})
    purge_tick(sessions=sessions, storage=storage, settings=forever)
    assert "recent" in _left(sessions, jobs)
    with sessions.begin() as session:  # leave nothing active for later tests
        session.execute(
            update(Job)
            .where(Job.id == jobs["active_old"])
            .values(status="cancelled", finished_at=func.now())
        )
