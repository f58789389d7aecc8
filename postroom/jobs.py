"""Jobs: their rows (create, find, cancel), their counts and spend, and what the router reads of
them. Shard state changes live in postroom.shards; functions take the session and never commit.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel
from sqlalchemy import case, func, or_, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from postroom.cancelling import cancel_active_job
from postroom.db.models import Job, Result, Shard
from postroom.domain import JOB_ACTIVE, SPILL_ROUTES, JobSpec, JobStatus, ShardState
from postroom.errors import NotFound
from postroom.intake import Rejected
from postroom.partitions import ensure_job_partition, insert_routed, results_part
from postroom.shard_numbers import EARLY_SHARD_BASE
from postroom.shards import add_shards, complete_job_if_done
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
    own_partition: bool = False  # its result rows get a partition of their own


ALL_INVALID = "every document was invalid and skipped; each result says why"


def own_partition_ahead(*, session: Session, job: Job) -> None:
    """Make a big job's results partition now, before its workers race to; if the table is too
    busy, its first writer makes it (postroom.partitions.insert_routed). A job whose creation
    then rolls back leaves an empty partition, dropped with its day."""
    try:
        ensure_job_partition(
            session.get_bind().engine, job.created_at.astimezone(UTC).date(), job.id
        )
    except DBAPIError as e:
        logger.warning("job %s: its results partition is left to its first writer: %s", job.id, e)


def create_job(*, session: Session, new: NewJob, receiving: bool = False) -> Job:
    """Insert the job, its shards and the failed results of skipped lines (status `queued`).

    `receiving`: the upload still streams (postroom.submit's early start): the job starts
    `validating` with no shards; add_received_shards adds them as they are written and
    seal_received_job the rest once the upload ended.
    """
    total = sum(new.shard_sizes) + len(new.rejected)
    # Nothing to run: it ends as it is created, `failed` when every line it had was skipped.
    ended = JobStatus.failed if new.rejected else JobStatus.completed
    status = JobStatus.queued if new.shard_sizes else ended
    if receiving:
        status = JobStatus.validating
    job = Job(
        id=new.job_id,
        tenant_id=new.tenant_id,
        status=status,
        error=ALL_INVALID if status == JobStatus.failed else None,
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
        own_partition=new.own_partition,
        total_docs=0 if receiving else total,
        rejected_docs=0 if receiving else len(new.rejected),
        shard_count=EARLY_SHARD_BASE if receiving else len(new.shard_sizes),
        finished_at=None if receiving or new.shard_sizes else func.now(),
    )
    session.add(job)
    session.flush()
    if new.own_partition:
        own_partition_ahead(session=session, job=job)
    if receiving:
        return job
    add_shards(
        session=session, job_id=new.job_id, shards=list(enumerate(new.shard_sizes)), queue=new.queue
    )
    _insert_rejected(session=session, job=job, new=new)
    if not new.shard_sizes:
        enqueue_job_event(session=session, job_id=new.job_id, event=f"job.{ended}")
    return job


def add_received_shards(
    *, session: Session, job_id: uuid.UUID, first: int, sizes: Sequence[int], queue: str
) -> bool:
    """Add the shards `first`, `first + 1`, … of a job still receiving its upload and count their
    documents; False (nothing added) when the job is no longer `validating` (cancelled or
    deleted meanwhile). The job row is locked, so this and a cancel are ordered."""
    status = session.execute(
        select(Job.status).where(Job.id == job_id).with_for_update(key_share=True)
    ).scalar_one()
    if status != JobStatus.validating:
        return False
    add_shards(
        session=session,
        job_id=job_id,
        shards=[(first + i, size) for i, size in enumerate(sizes)],
        queue=queue,
    )
    session.execute(
        update(Job).where(Job.id == job_id).values(total_docs=Job.total_docs + sum(sizes))
    )
    return True


def seal_received_job(*, session: Session, job: Job, new: NewJob, first: int) -> None:
    """The upload of a `validating` job ended: add its shards from `first` on, the failed results
    of skipped lines and the totals; it becomes `queued` (`running` when a shard started) and
    `completed` at once if every shard is done already. A job cancelled meanwhile stays so."""
    if not add_received_shards(
        session=session,
        job_id=new.job_id,
        first=first,
        sizes=new.shard_sizes[first:],
        queue=new.queue,
    ):
        session.refresh(job)
        return
    session.execute(
        update(Job)
        .where(Job.id == new.job_id)
        .values(
            status=case(
                (Job.started_at.is_(None), JobStatus.queued.value), else_=JobStatus.running.value
            ),
            total_docs=sum(new.shard_sizes) + len(new.rejected),
            rejected_docs=len(new.rejected),
            estimate=new.estimate,
        )
    )
    _insert_rejected(session=session, job=job, new=new)
    complete_job_if_done(session=session, job_id=new.job_id)
    session.refresh(job)


def _insert_rejected(*, session: Session, job: Job, new: NewJob) -> None:
    """The failed results of the lines an on_invalid=skip job runs without."""
    if not new.rejected:
        return
    created_at = job.created_at  # the server's now(), read back after the flush
    part = results_part(new.job_id, own_partition=job.own_partition)
    rows = [
        {
            "job_id": new.job_id,
            "doc_id": r.result_id,
            "job_created_at": created_at,
            "part": part,
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
    insert_routed(
        session,
        lambda: session.execute(insert(Result), rows),
        job_id=new.job_id,
        job_created_at=created_at,
        part=part,
    )


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
    if cancel_active_job(session=session, job_id=job_id):
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


def root_shards(*, session: Session, job: Job) -> int:
    """How many shards the job's documents were cut into (split parts not counted). A job that
    started early keeps EARLY_SHARD_BASE as its `shard_count`, so its shards are counted."""
    if job.shard_count < EARLY_SHARD_BASE:
        return job.shard_count
    return int(
        session.execute(
            select(func.count())
            .select_from(Shard)
            .where(Shard.job_id == job.id, Shard.shard_no < EARLY_SHARD_BASE)
        ).scalar_one()
    )


def job_counts(*, session: Session, job: Job) -> JobCounts:
    """Counts from the shard rows (a few thousand rows for a million documents), not results."""
    row = session.execute(
        select(
            func.coalesce(func.sum(Shard.succeeded), 0),
            func.coalesce(func.sum(Shard.failed), 0),
            func.coalesce(func.sum(Shard.doc_count).filter(Shard.route.in_(SPILL_ROUTES)), 0),
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
                Job.router_note,
                Job.deadline_lost,
            )
            .where(Job.status.in_(JOB_ACTIVE))
            .order_by(Job.created_at)
        ).all()
    )


def set_router_note(
    *, session: Session, job_id: uuid.UUID, note: str | None, deadline_lost: bool = False
) -> None:
    """Say why the router holds a job back (None clears it), and whether its deadline is lost; a
    no-op when it says so already."""
    session.execute(
        update(Job)
        .where(
            Job.id == job_id,
            or_(Job.router_note.is_distinct_from(note), Job.deadline_lost != deadline_lost),
        )
        .values(router_note=note, deadline_lost=deadline_lost)
    )


@dataclass(frozen=True)
class WorkOrder:
    """What a worker needs of a job to run one of its shards."""

    spec: JobSpec
    status: str
    shard_count: int
    created_at: datetime  # with `part`, the partition of the job's result rows
    part: uuid.UUID
    deadline: datetime | None = None
    total_docs: int = 0  # the cascade's cost cap is shared out pro rata


def work_order(*, session: Session, job_id: uuid.UUID) -> WorkOrder:
    row = session.execute(
        select(
            Job.spec,
            Job.status,
            Job.shard_count,
            Job.created_at,
            Job.own_partition,
            Job.deadline,
            Job.total_docs,
        ).where(Job.id == job_id)
    ).one()
    return WorkOrder(
        JobSpec.model_validate(row.spec),
        str(row.status),
        int(row.shard_count),
        row.created_at,
        results_part(job_id, own_partition=row.own_partition),
        row.deadline,
        int(row.total_docs),
    )
