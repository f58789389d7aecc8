"""The drop folder's `inbox_objects` rows, for `postroom beat`, event consumers and `postroom inbox
status`: compare-and-set state changes (the caller commits) and the queries of a tick.

States: `seen` (claimed for ingest, or waiting for job.json or a worker) → `ingested` (the job is
committed) → `running` (its shards are published) → `done` (results in outbox/, input in done/), or
`failed` (the reason says what to fix; the input is in failed/). `attempt` fences every change: a
holder whose lease was taken over changes nothing.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Iterable
from datetime import timedelta
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from control.inbox.objects import DropObject
from postroom.db.inbox_models import InboxObject
from postroom.db.models import Job
from postroom.domain import JobStatus

BATCH = 100  # rows per query of the tick's retry, publish and finalize steps


class InboxState(enum.StrEnum):
    seen = "seen"
    ingested = "ingested"
    running = "running"
    done = "done"
    failed = "failed"


FINISHED_JOB = (JobStatus.completed, JobStatus.failed, JobStatus.cancelled)
HOLDING = (InboxState.ingested, InboxState.running)  # a job exists; its outputs are not written


def _lease(seconds: float) -> Any:
    return func.now() + timedelta(seconds=seconds)


def _unheld() -> Any:
    """No one holds the row: no lease, or it ran out."""
    return or_(InboxObject.lease_until.is_(None), InboxObject.lease_until < func.now())


def claim_new(*, session: Session, obj: DropObject, lease_seconds: float) -> int | None:
    """Insert the object as `seen` and hold it; None when a row exists already (someone else's).

    `insert … on conflict do nothing`: of two watchers racing on one object version, the second
    waits for the first's commit and then gets nothing.
    """
    stmt = (
        insert(InboxObject)
        .values(
            id=obj.id,
            bucket=obj.bucket,
            key=obj.key,
            etag=obj.etag,
            size=obj.size,
            folder=obj.folder,
            file=obj.file,
            state=InboxState.seen,
            attempt=1,
            lease_until=_lease(lease_seconds),
        )
        .on_conflict_do_nothing()
        .returning(InboxObject.attempt)
    )
    return session.execute(stmt).scalar_one_or_none()


def reclaim(
    *, session: Session, object_id: uuid.UUID, lease_seconds: float, failed_too: bool = False
) -> int | None:
    """Take over a `seen` row whose lease ran out (its ingester died, or it was waiting), and with
    `failed_too` a failed row that never became a job (its object is back in the inbox)."""
    stale = and_(InboxObject.state == InboxState.seen, _unheld())
    if failed_too:
        stale = or_(
            stale, and_(InboxObject.state == InboxState.failed, InboxObject.job_id.is_(None))
        )
    return session.execute(
        update(InboxObject)
        .where(InboxObject.id == object_id, stale)
        .values(
            state=InboxState.seen,
            attempt=InboxObject.attempt + 1,
            lease_until=_lease(lease_seconds),
            finished_at=None,
            updated_at=func.now(),
        )
        .returning(InboxObject.attempt)
    ).scalar_one_or_none()


def _update_held(
    session: Session, object_id: uuid.UUID, attempt: int, states: Iterable[str], **values: Any
) -> bool:
    """Change the row only while this attempt holds it in one of `states`."""
    result = session.execute(
        update(InboxObject)
        .where(
            InboxObject.id == object_id,
            InboxObject.attempt == attempt,
            InboxObject.state.in_(list(states)),
        )
        .values(**values)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def _settle(state: InboxState, **values: Any) -> dict[str, Any]:
    """The values of a move to `state` that ends the current hold."""
    return {"state": state, "lease_until": None, "updated_at": func.now(), **values}


def extend_lease(
    *, session: Session, object_id: uuid.UUID, attempt: int, lease_seconds: float
) -> bool:
    """Push out the lease of an ingest still running; False when another tick took it over."""
    return _update_held(
        session, object_id, attempt, [InboxState.seen], lease_until=_lease(lease_seconds)
    )


def release(
    *, session: Session, object_id: uuid.UUID, attempt: int, reason: str, retry_seconds: float
) -> bool:
    """Leave a `seen` object for a later tick, saying what it waits for."""
    return _update_held(
        session,
        object_id,
        attempt,
        [InboxState.seen],
        reason=reason,
        lease_until=_lease(retry_seconds),
        updated_at=func.now(),
    )


def mark_ingested(*, session: Session, object_id: uuid.UUID, attempt: int) -> bool:
    """The ingest's fence: True for exactly one holder of the row, which then creates the job in
    the same transaction. A holder whose lease was taken over gets False and must roll back."""
    values = _settle(InboxState.ingested, reason=None, ingested_at=func.now())
    return _update_held(session, object_id, attempt, [InboxState.seen], **values)


def link_job(
    *, session: Session, object_id: uuid.UUID, job_id: uuid.UUID, results_format: str = "jsonl"
) -> None:
    """Record the job (inserted after mark_ingested in the same transaction: foreign key) and the
    format its outbox results are to be written in."""
    session.execute(
        update(InboxObject)
        .where(InboxObject.id == object_id)
        .values(job_id=job_id, results_format=results_format)
    )


def mark_running(*, session: Session, object_id: uuid.UUID) -> bool:
    result = session.execute(
        update(InboxObject)
        .where(InboxObject.id == object_id, InboxObject.state == InboxState.ingested)
        .values(state=InboxState.running, updated_at=func.now())
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def claim_finalize(*, session: Session, object_id: uuid.UUID, lease_seconds: float) -> int | None:
    """Hold an object whose job finished while its outputs are written and its input moved."""
    return session.execute(
        update(InboxObject)
        .where(InboxObject.id == object_id, InboxObject.state.in_(HOLDING), _unheld())
        .values(attempt=InboxObject.attempt + 1, lease_until=_lease(lease_seconds))
        .returning(InboxObject.attempt)
    ).scalar_one_or_none()


def mark_done(*, session: Session, object_id: uuid.UUID, attempt: int) -> bool:
    values = _settle(InboxState.done, finished_at=func.now())
    return _update_held(session, object_id, attempt, HOLDING, **values)


def mark_failed(*, session: Session, object_id: uuid.UUID, attempt: int, reason: str) -> bool:
    values = _settle(InboxState.failed, reason=reason, finished_at=func.now())
    return _update_held(session, object_id, attempt, [InboxState.seen, *HOLDING], **values)


def known_objects(
    *, session: Session, bucket: str, keys: Iterable[str]
) -> dict[tuple[str, str], InboxObject]:
    """Rows of these keys, by (key, etag)."""
    rows = session.scalars(
        select(InboxObject).where(InboxObject.bucket == bucket, InboxObject.key.in_(list(keys)))
    )
    return {(row.key, row.etag): row for row in rows}


def stale_objects(*, session: Session, bucket: str, limit: int) -> list[InboxObject]:
    """`seen` objects nobody holds: a waiting object's retry is due, or its ingester died."""
    return list(
        session.scalars(
            select(InboxObject)
            .where(
                InboxObject.bucket == bucket,
                InboxObject.state == InboxState.seen,
                InboxObject.lease_until < func.now(),
            )
            .order_by(InboxObject.lease_until)
            .limit(limit)
        )
    )


def unpublished_objects(*, session: Session, limit: int) -> list[InboxObject]:
    """Committed jobs whose shards may not be published yet (the tick died in between)."""
    return list(
        session.scalars(
            select(InboxObject).where(InboxObject.state == InboxState.ingested).limit(limit)
        )
    )


def finished_objects(*, session: Session, limit: int) -> list[tuple[InboxObject, str]]:
    """Objects whose job completed, failed or was cancelled, with that status, free to finalize."""
    rows = session.execute(
        select(InboxObject, Job.status)
        .join(Job, Job.id == InboxObject.job_id)
        .where(InboxObject.state.in_(HOLDING), Job.status.in_(FINISHED_JOB), _unheld())
        .order_by(Job.finished_at)
        .limit(limit)
    ).all()
    return [(row, str(status)) for row, status in rows]


def job_error(*, session: Session, job_id: uuid.UUID) -> str | None:
    """Why a finished job failed, if it says."""
    job = session.get(Job, job_id)
    return job.error if job is not None else None


def inbox_report(*, session: Session, state: str | None = None, limit: int = 50) -> dict[str, Any]:
    """What `postroom inbox status` shows: counts per state and the latest objects."""
    counts = dict(
        session.execute(select(InboxObject.state, func.count()).group_by(InboxObject.state)).all()
    )
    query = (
        select(InboxObject, Job.status)
        .outerjoin(Job, Job.id == InboxObject.job_id)
        .order_by(InboxObject.seen_at.desc(), InboxObject.key)
        .limit(limit)
    )
    if state:
        query = query.where(InboxObject.state == state)
    objects = [
        {
            "bucket": row.bucket,
            "key": row.key,
            "etag": row.etag,
            "size": row.size,
            "state": row.state,
            "job_id": str(row.job_id) if row.job_id else None,
            "job_status": job_status,
            "reason": row.reason,
            "seen_at": row.seen_at.isoformat(),
            "updated_at": row.updated_at.isoformat(),
        }
        for row, job_status in session.execute(query).all()
    ]
    return {
        "counts": {s.value: int(counts.get(s.value, 0)) for s in InboxState},
        "objects": objects,
    }
