"""Cancelling a job: the shards no worker holds stop, running ones finish (their results stay);
a shard a worker claimed as its job was cancelled ends cancelled (cancel_held)."""

from __future__ import annotations

import uuid

from sqlalchemy import func, select, tuple_, update
from sqlalchemy.orm import Session

from postroom.db.models import Job, Shard
from postroom.domain import JOB_ACTIVE, SHARD_CLAIMABLE, JobStatus, ShardState
from postroom.shards import held


def cancel_active_job(*, session: Session, job_id: uuid.UUID) -> bool:
    """Cancel a job that is still active, and its shards that no worker holds (running ones
    finish); False when the job had ended already.

    The shard rows are locked before the job row. A worker's claim locks its shard row, then the
    job row (claim_shard); taking the job row first here deadlocks with it, and Postgres ends
    one of the two (the API would answer 500). A job that ends between the read and the update
    has no claimable shard left (or was cancelled by another call): the shards' update is moot.

    An upload's seal (postroom.jobs.add_received_shards) holds the job row while it inserts
    shards this first pass cannot see yet; once the job row is ours they are committed, and a
    second pass cancels them. It skips the rows another transaction holds (a claim that now
    waits on the job row; its worker then finds the job cancelled and ends the shard so,
    cancel_held below): waiting on a shard while holding the job row is the deadlock
    above."""
    status = session.execute(select(Job.status).where(Job.id == job_id)).scalar_one_or_none()
    if status not in JOB_ACTIVE:
        return False
    _cancel_claimable(session=session, job_id=job_id, skip_locked=False)
    cancelled = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.in_(JOB_ACTIVE))
        .values(status=JobStatus.cancelled, finished_at=func.now())
        .returning(Job.id)
    ).scalar_one_or_none()
    if cancelled is None:
        return False
    _cancel_claimable(session=session, job_id=job_id, skip_locked=True)
    return True


def _cancel_claimable(*, session: Session, job_id: uuid.UUID, skip_locked: bool) -> None:
    claimable = (
        select(Shard.job_id, Shard.shard_no)
        .where(Shard.job_id == job_id, Shard.state.in_(SHARD_CLAIMABLE))
        .with_for_update(skip_locked=skip_locked)
    )
    session.execute(
        update(Shard)
        .where(tuple_(Shard.job_id, Shard.shard_no).in_(claimable))
        .values(state=ShardState.cancelled, finished_at=func.now())
    )


def cancel_held(*, session: Session, job_id: uuid.UUID, shard_no: int, attempt: int) -> bool:
    """End a held shard of a job cancelled as it was claimed (cancel_active_job skips a shard a
    claim holds): cancelled, no results. False: not held."""
    result = session.execute(
        update(Shard)
        .where(held(job_id, shard_no, attempt))
        .values(state=ShardState.cancelled, lease_until=None, finished_at=func.now())
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]
