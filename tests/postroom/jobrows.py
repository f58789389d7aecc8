"""Builders for job and shard rows straight in Postgres (no S3, no broker): the state machine's
tests start from here."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from postroom.db.models import Job, Shard
from postroom.domain import JobSpec, Label
from postroom.intake import Rejected
from postroom.jobs import NewJob, create_job
from postroom.shards import Claimed, claim_shard, finish_shard
from postroom.tenants import ensure_tenant

SPEC = JobSpec(
    labels=[Label(name="a"), Label(name="b")],
    instructions="Pick one.",
    mode="generative",
    model="tiny",
    revision="tiny-seed0",
    decoding="score",
)


def make_job(
    sessions: sessionmaker[Session],
    *,
    sizes: tuple[int, ...] = (3, 3),
    queue: str = "gpu.rows",
    rejected: tuple[Rejected, ...] = (),
    tenant: str | None = None,
    priority: str = "normal",
    deadline: datetime | None = None,
    own_partition: bool = False,
    receiving: bool = False,
) -> uuid.UUID:
    """A committed job with shards of these sizes on `queue`, for a tenant of its own
    (`own_partition`: its results go to a partition of their own, as a big job's do;
    `receiving`: `validating`, as an upload that started early, with no shards yet)."""
    job_id = uuid.uuid4()
    with sessions.begin() as session:
        tenant_id = ensure_tenant(session=session, name=tenant or f"t-{job_id.hex[:12]}")
        create_job(
            session=session,
            new=NewJob(
                job_id=job_id,
                tenant_id=tenant_id,
                spec=SPEC,
                spill="auto",
                priority=priority,
                deadline=deadline,
                metadata=None,
                idempotency_key=None,
                body_hash=None,
                shard_sizes=sizes,
                rejected=rejected,
                queue=queue,
                own_partition=own_partition,
            ),
            receiving=receiving,
        )
    return job_id


def shard_row(sessions: sessionmaker[Session], job_id: uuid.UUID, shard_no: int) -> Shard:
    with sessions() as session:
        row = session.get_one(Shard, (job_id, shard_no))
        session.expunge(row)
        return row


def job_status(sessions: sessionmaker[Session], job_id: uuid.UUID) -> str:
    with sessions() as session:
        return str(session.execute(select(Job.status).where(Job.id == job_id)).scalar_one())


def claim(
    sessions: sessionmaker[Session],
    job_id: uuid.UUID,
    shard_no: int,
    *,
    lease: int = 60,
    route: str = "gpu",
) -> Claimed | None:
    with sessions.begin() as session:
        return claim_shard(
            session=session,
            job_id=job_id,
            shard_no=shard_no,
            worker="w1",
            lease_seconds=lease,
            route=route,
        )


def finish(sessions: sessionmaker[Session], job_id: uuid.UUID, shard_no: int, attempt: int) -> bool:
    with sessions.begin() as session:
        return finish_shard(
            session=session,
            job_id=job_id,
            shard_no=shard_no,
            attempt=attempt,
            succeeded=3,
            failed=0,
            route="gpu",
        )
