"""Fixtures of the shared package's tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from postroom.db.models import Job, Shard
from postroom.domain import JOB_ACTIVE, SHARD_FINISHED, JobStatus, ShardState


@pytest.fixture
def stop_jobs_made_here(sessions: sessionmaker[Session]) -> Iterator[None]:
    """Jobs a test makes by hand must not linger as work for later tests (the router and the
    reaper see every active job, and a running shard counts as work ahead): cancel what is left
    of the jobs created during the test, running shards included."""
    with sessions() as session:
        started = session.execute(select(func.clock_timestamp())).scalar_one()
    yield
    with sessions.begin() as session:
        jobs = select(Job.id).where(Job.created_at >= started)
        session.execute(
            update(Shard)
            .where(Shard.job_id.in_(jobs), Shard.state.not_in(SHARD_FINISHED))
            .values(state=ShardState.cancelled, lease_until=None, finished_at=func.now())
        )
        session.execute(
            update(Job)
            .where(Job.id.in_(jobs), Job.status.in_(JOB_ACTIVE))
            .values(status=JobStatus.cancelled, finished_at=func.now())
        )
