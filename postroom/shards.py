"""Shards: every compare-and-set on the `shards` table, and the two job transitions a shard causes
(its first claim makes the job `running`, the last finish makes it `completed`).

States: queued → running (claimed; a lease and a fencing `attempt`) → done, or back to queued
(released after a transient failure), expired (the lease ran out: the worker died or hung),
replaced (split to isolate a poison document) or cancelled. Functions take the session and never
commit: the caller (a route, a task body, the beat) owns the transaction.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from postroom.db.models import Job, Shard
from postroom.domain import (
    QUEUE_SPILL,
    SHARD_CLAIMABLE,
    SHARD_FINISHED,
    JobStatus,
    ShardState,
)
from postroom.webhooks import enqueue_job_event

logger = logging.getLogger(__name__)


def add_shards(
    *, session: Session, job_id: uuid.UUID, shards: Sequence[tuple[int, int]], queue: str
) -> None:
    """Insert queued shards, given as (shard_no, documents); one that exists already stays."""
    if not shards:
        return
    session.execute(
        insert(Shard).on_conflict_do_nothing(),
        [
            {
                "job_id": job_id,
                "shard_no": shard_no,
                "state": ShardState.queued,
                "queue": queue,
                "doc_count": size,
                "attempt": 0,
            }
            for shard_no, size in shards
        ],
    )


@dataclass(frozen=True)
class Claimed:
    """A shard this worker holds: `attempt` is the fencing token; `crashes` counts earlier
    attempts that ended without giving the shard back (the worker died or hung), which is what
    poison isolation looks at."""

    attempt: int
    crashes: int
    queue: str
    error: str | None = None  # what the last failed attempt raised (None: it died or hung)


def claim_shard(
    *,
    session: Session,
    job_id: uuid.UUID,
    shard_no: int,
    worker: str,
    lease_seconds: int,
    route: str = "gpu",
) -> Claimed | None:
    """Take a shard for work; None when it is not claimable on this route.

    A shard can be claimed when it is queued, expired, or running with a lease that ran out (its
    worker died). A duplicate delivery finds it running or done and gets None: a no-op.
    """
    attempt = session.execute(
        update(Shard)
        .where(
            Shard.job_id == job_id,
            Shard.shard_no == shard_no,
            or_(
                Shard.state.in_(SHARD_CLAIMABLE),
                and_(Shard.state == ShardState.running, Shard.lease_until < func.now()),
            ),
            # The router moves shards between routes; a stale message on the other route is a
            # no-op, so a shard is never worked by both.
            (Shard.queue == QUEUE_SPILL) if route == "spill" else (Shard.queue != QUEUE_SPILL),
        )
        .values(
            state=ShardState.running,
            attempt=Shard.attempt + 1,
            lease_until=func.now() + timedelta(seconds=lease_seconds),
            worker=worker,
            started_at=func.now(),
        )
        .returning(Shard.attempt, Shard.releases, Shard.queue, Shard.error)
    ).one_or_none()
    if attempt is not None:
        session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == JobStatus.queued)
            .values(status=JobStatus.running, started_at=func.now())
        )
        # A job still receiving its upload (`validating`) runs early shards but stays
        # `validating` until the upload is sealed (postroom.submit): only its start is stamped.
        session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == JobStatus.validating, Job.started_at.is_(None))
            .values(started_at=func.now())
        )
    if attempt is None:
        return None
    number, releases, queue, error = attempt
    return Claimed(attempt=number, crashes=number - 1 - releases, queue=queue, error=error)


def claim_next_of_job(
    *,
    session: Session,
    job_id: uuid.UUID,
    queue: str,
    shard_count: int,
    worker: str,
    lease_seconds: int,
    route: str,
) -> tuple[int, Claimed] | None:
    """Claim a job's lowest-numbered claimable shard of `queue` that is not under suspicion
    (no crash behind it, not a part of a split: those are claimed by name, alone); None when
    there is none, or when other workers hold the row locks of all of them (SKIP LOCKED)."""
    shard_no = session.execute(
        select(Shard.shard_no)
        .where(
            Shard.job_id == job_id,
            Shard.queue == queue,
            Shard.state.in_(SHARD_CLAIMABLE),
            Shard.attempt == Shard.releases,
            Shard.shard_no < shard_count,
        )
        .order_by(Shard.shard_no)
        .limit(1)
        .with_for_update(skip_locked=True)
    ).scalar_one_or_none()
    if shard_no is None:
        return None
    claimed = claim_shard(
        session=session,
        job_id=job_id,
        shard_no=shard_no,
        worker=worker,
        lease_seconds=lease_seconds,
        route=route,
    )
    return None if claimed is None else (shard_no, claimed)


def held(job_id: uuid.UUID, shard_no: int, attempt: int) -> Any:
    """The fence: the shard is running and this attempt still holds it."""
    return and_(
        Shard.job_id == job_id,
        Shard.shard_no == shard_no,
        Shard.attempt == attempt,
        Shard.state == ShardState.running,
    )


def extend_leases(
    *, session: Session, leases: Sequence[tuple[uuid.UUID, int, int]], lease_seconds: int
) -> int:
    """Push out the leases of shards still being worked (job_id, shard_no, attempt)."""
    extended = 0
    for job_id, shard_no, attempt in leases:
        result = session.execute(
            update(Shard)
            .where(held(job_id, shard_no, attempt))
            # Never shorter: a shard parked on a remote batch keeps its long lease.
            .values(
                lease_until=func.greatest(
                    Shard.lease_until, func.now() + timedelta(seconds=lease_seconds)
                )
            )
        )
        extended += result.rowcount  # type: ignore[attr-defined]
    return extended


def release_shard(*, session: Session, job_id: uuid.UUID, shard_no: int, attempt: int) -> bool:
    """Give a shard back after a transient failure so another delivery can claim it."""
    result = session.execute(
        update(Shard)
        .where(held(job_id, shard_no, attempt))
        .values(state=ShardState.queued, lease_until=None, worker=None, releases=Shard.releases + 1)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def fail_attempt(
    *, session: Session, job_id: uuid.UUID, shard_no: int, attempt: int, error: str
) -> bool:
    """End an attempt that raised (not transiently): the shard is claimable at once, as if its
    lease had run out, the attempt counts like a crash, and `error` says why. False: not held."""
    result = session.execute(
        update(Shard)
        .where(held(job_id, shard_no, attempt))
        .values(
            state=ShardState.expired,
            lease_until=None,
            worker=None,
            enqueued_at=None,
            error=error[:2000],
        )
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def finish_shard(
    *,
    session: Session,
    job_id: uuid.UUID,
    shard_no: int,
    attempt: int,
    succeeded: int,
    failed: int,
    route: str,
    tokens_in: int = 0,
    tokens_out: int = 0,
    cascade: Mapping[str, int] | None = None,
) -> bool:
    """Mark a shard done if this attempt still holds it (fencing); complete the job when last.
    `cascade` holds the shard's cascade counts (its `cascade_*` columns), when the job has one.

    Returns False when the lease was lost: the caller must roll back, so a late writer never
    overwrites a newer attempt's results.
    """
    won = session.execute(
        update(Shard)
        .where(held(job_id, shard_no, attempt))
        .values(
            state=ShardState.done,
            succeeded=succeeded,
            failed=failed,
            route=route,
            tokens_in=tokens_in,
            tokens_out=tokens_out,
            lease_until=None,
            finished_at=func.now(),
            **(cascade or {}),
        )
        .returning(Shard.shard_no)
    ).scalar_one_or_none()
    if won is None:
        return False
    complete_job_if_done(session=session, job_id=job_id)
    return True


ALL_FAILED = "every document failed; each result says why (GET /v1/jobs/{id}/results?only=failed)"


def complete_job_if_done(*, session: Session, job_id: uuid.UUID) -> bool:
    """Set the job `completed` when no shard is left unfinished, or `failed` when not one of its
    documents succeeded (a job with some failed documents is `completed`); the webhook event
    (job.completed or job.failed) commits with it.

    The job row is locked first so two workers finishing the last two shards at once cannot both
    miss each other's commit. FOR NO KEY UPDATE, not FOR UPDATE: the result rows this transaction
    just inserted hold FOR KEY SHARE on the job through their foreign key, and so do other
    shards' transactions; FOR UPDATE would conflict with those and deadlock two finishing shards.
    """
    status = session.execute(
        select(Job.status).where(Job.id == job_id).with_for_update(key_share=True)
    ).scalar_one()
    if status not in (JobStatus.queued, JobStatus.running):  # `validating`: more may come
        return False
    unfinished = session.execute(
        select(func.count())
        .select_from(Shard)
        .where(Shard.job_id == job_id, Shard.state.not_in(SHARD_FINISHED))
    ).scalar_one()
    if unfinished:
        return False
    succeeded = session.execute(
        select(func.coalesce(func.sum(Shard.succeeded), 0)).where(Shard.job_id == job_id)
    ).scalar_one()
    total = session.execute(select(Job.total_docs).where(Job.id == job_id)).scalar_one()
    failed = total > 0 and not succeeded
    session.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(
            status=JobStatus.failed if failed else JobStatus.completed,
            finished_at=func.now(),
            **({"error": ALL_FAILED} if failed else {}),
        )
    )
    event = "job.failed" if failed else "job.completed"
    enqueue_job_event(session=session, job_id=job_id, event=event)
    logger.info("job %s %s", job_id, "failed: no document succeeded" if failed else "completed")
    return True


def expire_leases(*, session: Session) -> int:
    """Mark running shards whose lease ran out as `expired` (their worker died or hung)."""
    result = session.execute(
        update(Shard)
        .where(Shard.state == ShardState.running, Shard.lease_until < func.now())
        .values(state=ShardState.expired, worker=None, enqueued_at=None)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


def mark_published(*, session: Session, shards: Sequence[tuple[uuid.UUID, int]]) -> None:
    """Record that these (job_id, shard_no) were announced: one UPDATE per job."""
    by_job: dict[uuid.UUID, list[int]] = {}
    for job_id, shard_no in shards:
        by_job.setdefault(job_id, []).append(shard_no)
    for job_id, numbers in by_job.items():
        session.execute(
            update(Shard)
            .where(Shard.job_id == job_id, Shard.shard_no.in_(numbers))
            .values(enqueued_at=func.now())
        )


def split_shard(
    *,
    session: Session,
    job_id: uuid.UUID,
    shard_no: int,
    attempt: int,
    children: Sequence[int],
    child_sizes: Sequence[int],
    queue: str,
) -> list[int]:
    """Replace a shard that keeps failing by smaller ones (numbered by child_shard_nos).

    Fenced like finish_shard: returns [] when this attempt no longer holds the shard.
    """
    won = session.execute(
        update(Shard)
        .where(held(job_id, shard_no, attempt))
        .values(state=ShardState.replaced, lease_until=None, finished_at=func.now())
        .returning(Shard.shard_no)
    ).scalar_one_or_none()
    if won is None:
        return []
    add_shards(
        session=session,
        job_id=job_id,
        shards=list(zip(children, child_sizes, strict=True)),
        queue=queue,
    )
    return list(children)


def mark_results_written(*, session: Session, job_id: uuid.UUID, shard_no: int) -> None:
    session.execute(
        update(Shard)
        .where(Shard.job_id == job_id, Shard.shard_no == shard_no)
        .values(results_written_at=func.now())
    )


def move_unclaimed(
    *, session: Session, job_id: uuid.UUID, shard_nos: Sequence[int], to_queue: str
) -> list[int]:
    """Move unclaimed shards between routes (GPU queue ↔ spill); returns those that moved.

    Only shards still unclaimed and still on the other route move, so a shard a worker claimed
    meanwhile stays where it is, and a worker only claims shards of its own route (claim_shard).
    """
    leaving = Shard.queue != QUEUE_SPILL if to_queue == QUEUE_SPILL else Shard.queue == QUEUE_SPILL
    moved = session.scalars(
        update(Shard)
        .where(
            Shard.job_id == job_id,
            Shard.shard_no.in_(list(shard_nos)),
            Shard.state.in_(SHARD_CLAIMABLE),
            leaving,
        )
        .values(queue=to_queue, enqueued_at=None)
        .returning(Shard.shard_no)
    ).all()
    return sorted(moved)
