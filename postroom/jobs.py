"""Jobs: their rows (create, find, cancel), their counts and spend, and what the router reads of
them. Shard state changes live in postroom.shards; functions take the session and never commit.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import BaseModel
from sqlalchemy import func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from postroom.db.models import Job, Result, Shard
from postroom.domain import JOB_ACTIVE, JobSpec, JobStatus, ShardState
from postroom.errors import NotFound
from postroom.intake import Rejected
from postroom.shards import add_shards, cancel_unclaimed
from postroom.webhooks import enqueue_job_event

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class NewJob:
    """What a submission has validated and written to S3, ready to become rows."""

    job_id: uuid.UUID
    tenant_id: uuid.UUID
    spec: JobSpec
    spill: str
    deadline: datetime | None
    metadata: dict[str, Any] | None
    idempotency_key: str | None
    body_hash: str | None
    shard_sizes: Sequence[int]
    rejected: Sequence[Rejected]
    queue: str
    warnings: Sequence[str] = ()
    max_spill_cost: float | None = None
    estimate: dict[str, Any] | None = None
    webhook_url: str | None = None
    expires_after: int | None = None
    priority: str = "normal"


def create_job(*, session: Session, new: NewJob) -> Job:
    """Insert the job, its shards and the failed results of skipped lines (status `queued`)."""
    total = sum(new.shard_sizes) + len(new.rejected)
    job = Job(
        id=new.job_id,
        tenant_id=new.tenant_id,
        status=JobStatus.queued if new.shard_sizes else JobStatus.completed,
        spec=new.spec.model_dump(mode="json"),
        model=new.spec.model,
        spill=new.spill,
        priority=new.priority,
        deadline=new.deadline,
        job_metadata=new.metadata,
        warnings=list(new.warnings),
        idempotency_key=new.idempotency_key,
        body_hash=new.body_hash,
        max_spill_cost=new.max_spill_cost,
        estimate=new.estimate,
        webhook_url=new.webhook_url,
        expires_after=new.expires_after,
        total_docs=total,
        rejected_docs=len(new.rejected),
        shard_count=len(new.shard_sizes),
        finished_at=None if new.shard_sizes else func.now(),
    )
    session.add(job)
    session.flush()
    add_shards(
        session=session, job_id=new.job_id, shards=list(enumerate(new.shard_sizes)), queue=new.queue
    )
    if new.rejected:
        created_at = job.created_at  # the server's now(), read back after the flush
        rows = [
            {
                "job_id": new.job_id,
                "doc_id": r.result_id,
                "job_created_at": created_at,
                "shard_no": -1,
                "line": r.line,
                "error": f"invalid_document: line {r.line}"
                + (f", field {r.field}" if r.field else "")
                + f": {r.reason}",
                "model": new.spec.model,
                "revision": new.spec.revision,
            }
            for r in new.rejected
        ]
        for start in range(0, len(rows), 1000):
            session.execute(insert(Result), rows[start : start + 1000])
    if not new.shard_sizes:  # nothing to run: completed as it is created
        enqueue_job_event(session=session, job_id=new.job_id, event="job.completed")
    return job


def find_job(*, session: Session, tenant_id: uuid.UUID | None, job_id: uuid.UUID) -> Job:
    """The job, if it exists and belongs to the tenant (None = any tenant: workers, admins)."""
    job = session.get(Job, job_id)
    # A job being deleted is gone already.
    if (
        job is None
        or job.deleted_at is not None
        or (tenant_id is not None and job.tenant_id != tenant_id)
    ):
        raise NotFound(f"no job {job_id}; check the id (jobs of other tenants are not visible)")
    return job


def cancel_job(
    *, session: Session, tenant_id: uuid.UUID, job_id: uuid.UUID, event: str = "job.cancelled"
) -> Job:
    """Stop what has not started. Running shards finish; finished results stay. The webhook
    `event` (job.cancelled, or job.expired when its time ran out) commits with the change."""
    job = find_job(session=session, tenant_id=tenant_id, job_id=job_id)
    changed = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.in_(JOB_ACTIVE))
        .values(status=JobStatus.cancelled, finished_at=func.now())
        .returning(Job.id)
    ).scalar_one_or_none()
    if changed is not None:
        cancel_unclaimed(session=session, job_id=job_id)
        enqueue_job_event(session=session, job_id=job_id, event=event)
    session.refresh(job)
    return job


class JobCounts(BaseModel):
    """Documents of a job by outcome (also the `counts` of the API's JobPublic)."""

    total: int
    succeeded: int
    failed: int
    pending: int
    spilled: int
    cancelled: int


def job_counts(*, session: Session, job: Job) -> JobCounts:
    """Counts from the shard rows (a few thousand rows for a million documents), not results."""
    row = session.execute(
        select(
            func.coalesce(func.sum(Shard.succeeded), 0),
            func.coalesce(func.sum(Shard.failed), 0),
            func.coalesce(func.sum(Shard.doc_count).filter(Shard.route == "spill"), 0),
            func.coalesce(func.sum(Shard.doc_count).filter(Shard.state == ShardState.cancelled), 0),
        ).where(Shard.job_id == job.id)
    ).one()
    succeeded, failed, spilled, cancelled = (int(v) for v in row)
    failed += job.rejected_docs
    pending = max(job.total_docs - succeeded - failed - cancelled, 0)
    return JobCounts(
        total=job.total_docs,
        succeeded=succeeded,
        failed=failed,
        pending=pending,
        spilled=spilled,
        cancelled=cancelled,
    )


def spend_by_route(*, session: Session, job_id: uuid.UUID) -> dict[str, dict[str, int]]:
    rows = session.execute(
        select(
            Shard.route,
            func.sum(Shard.succeeded + Shard.failed),
            func.sum(Shard.tokens_in),
            func.sum(Shard.tokens_out),
        )
        .where(Shard.job_id == job_id, Shard.state == ShardState.done)
        .group_by(Shard.route)
    ).all()
    return {
        str(route): {"docs": int(d or 0), "tokens_in": int(i or 0), "tokens_out": int(o or 0)}
        for route, d, i, o in rows
        if route
    }


def cascade_totals(*, session: Session, job_id: uuid.UUID) -> dict[str, int]:
    """The cascade's counts and frontier tokens over the job's finished shards."""
    columns = (
        Shard.cascade_docs,
        Shard.cascade_failed,
        Shard.cascade_agreed,
        Shard.cascade_capped,
        Shard.cascade_tokens_in,
        Shard.cascade_tokens_out,
    )
    row = session.execute(
        select(*(func.coalesce(func.sum(c), 0) for c in columns)).where(
            Shard.job_id == job_id, Shard.state == ShardState.done
        )
    ).one()
    names = ("escalated", "failed", "agreed", "capped", "tokens_in", "tokens_out")
    return {name: int(value) for name, value in zip(names, row, strict=True)}


def active_jobs(*, session: Session) -> list[Any]:
    """What the router weighs of each active job, oldest first."""
    return list(
        session.execute(
            select(
                Job.id,
                Job.model,
                Job.spill,
                Job.deadline,
                Job.max_spill_cost,
                Job.estimate,
                Job.created_at,
            )
            .where(Job.status.in_(JOB_ACTIVE))
            .order_by(Job.created_at)
        ).all()
    )


def set_router_note(*, session: Session, job_id: uuid.UUID, note: str | None) -> None:
    """Say why the router holds a job back (None clears it); a no-op when it says so already."""
    session.execute(
        update(Job)
        .where(Job.id == job_id, Job.router_note.is_distinct_from(note))
        .values(router_note=note)
    )


@dataclass(frozen=True)
class WorkOrder:
    """What a worker needs of a job to run one of its shards."""

    spec: JobSpec
    status: str
    shard_count: int
    created_at: datetime  # the partition of the job's result rows
    total_docs: int = 0  # the cascade's cost cap is shared out pro rata


def work_order(*, session: Session, job_id: uuid.UUID) -> WorkOrder:
    row = session.execute(
        select(Job.spec, Job.status, Job.shard_count, Job.created_at, Job.total_docs).where(
            Job.id == job_id
        )
    ).one()
    return WorkOrder(
        JobSpec.model_validate(row.spec),
        str(row.status),
        int(row.shard_count),
        row.created_at,
        int(row.total_docs),
    )
