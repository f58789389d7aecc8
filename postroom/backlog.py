"""What waits and how fast it drains: the read-only shard queries that the router, the reaper and
the worker's admission plan with. State changes live in postroom.shards."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session

from postroom.db.models import Job, Shard
from postroom.domain import JOB_ACTIVE, QUEUE_SPILL, SHARD_CLAIMABLE, ShardState

MIN_RATE_SPAN_S = 1.0  # a rate is never measured over less than this


def _waiting(*columns: Any) -> Any:
    """A select of claimable shards of active jobs (their job joined)."""
    return (
        select(*columns)
        .join(Job, Job.id == Shard.job_id)
        .where(Job.status.in_(JOB_ACTIVE), Shard.state.in_(SHARD_CLAIMABLE))
    )


def shard_admission(*, session: Session, job_id: uuid.UUID, shard_no: int) -> Any:
    """(attempt, releases, shard_count, queue, claimable) of a shard before it is claimed, or
    None: a stale message. A shard with crashes behind it, or a part of a split, is claimed by
    name and runs alone (admission)."""
    claimable = or_(
        Shard.state.in_(SHARD_CLAIMABLE),
        and_(Shard.state == ShardState.running, Shard.lease_until < func.now()),
    )
    return session.execute(
        select(
            Shard.attempt,
            Shard.releases,
            Job.shard_count,
            Shard.queue,
            claimable.label("claimable"),
        )
        .join(Job, Job.id == Shard.job_id)
        .where(Shard.job_id == job_id, Shard.shard_no == shard_no)
    ).one_or_none()


def unpublished_shards(*, session: Session, job_id: uuid.UUID) -> list[tuple[int, str]]:
    """(shard_no, queue) of a job's queued shards that no message announced yet."""
    rows = session.execute(
        select(Shard.shard_no, Shard.queue).where(
            Shard.job_id == job_id, Shard.state == ShardState.queued, Shard.enqueued_at.is_(None)
        )
    ).all()
    return [(shard_no, queue) for shard_no, queue in rows]


def claimable_queues(*, session: Session) -> list[str]:
    """The queues that have a shard waiting to be claimed."""
    return list(
        session.scalars(
            select(Shard.queue).distinct().where(Shard.state.in_(SHARD_CLAIMABLE))
        ).all()
    )


@dataclass(frozen=True)
class QueueCount:
    """Claimable shards of a queue, as the doorbell reconciliation sees them."""

    claimable: int  # all of them
    settled: int  # those not announced within the grace period (or never)
    fresh: bool  # a shard of this queue was announced within the grace period


def doorbell_counts(*, session: Session, grace_seconds: float) -> dict[str, QueueCount]:
    """Per queue with a claimable shard of an active job: how many doorbells it should have."""
    recent = func.now() - timedelta(seconds=grace_seconds)
    rows = session.execute(
        _waiting(
            Shard.queue,
            func.count(),
            func.count().filter(or_(Shard.enqueued_at.is_(None), Shard.enqueued_at < recent)),
            func.bool_or(Shard.enqueued_at >= recent),
        ).group_by(Shard.queue)
    ).all()
    return {
        queue: QueueCount(int(total), int(settled), bool(fresh))
        for queue, total, settled, fresh in rows
    }


def doorbells_owed(
    *, session: Session, queue: str, limit: int, grace_seconds: float
) -> list[tuple[uuid.UUID, int, str]]:
    """Claimable shards of a queue to name in new doorbells when the broker holds fewer than
    there are shards: suspects first (only a message naming them claims them), then the never
    announced, then the longest announced."""
    recent = func.now() - timedelta(seconds=grace_seconds)
    suspect = or_(Shard.attempt > Shard.releases, Shard.shard_no >= Job.shard_count)
    rows = session.execute(
        _waiting(Shard.job_id, Shard.shard_no, Shard.queue)
        .where(Shard.queue == queue, or_(Shard.enqueued_at.is_(None), Shard.enqueued_at < recent))
        .order_by(suspect.desc(), Shard.enqueued_at.asc().nulls_first(), Shard.shard_no)
        .limit(limit)
    ).all()
    return [(job_id, shard_no, q) for job_id, shard_no, q in rows]


def shards_to_republish(
    *, session: Session, idle_queues: Sequence[str], grace_seconds: float, stale_seconds: float
) -> list[tuple[uuid.UUID, int, str]]:
    """Claimable shards of active jobs whose doorbell may be lost, so they need a new message.

    - never published (`enqueued_at` NULL: the broker was down at submission, or the lease expired);
    - published but their queue is empty in the broker, so the message is gone (Redis restarted
      empty, FLUSHALL, or a pop-before-ack loss) — after `grace_seconds`, which covers a message
      popped and about to be claimed;
    - published longer ago than `stale_seconds`, whatever the queue shows (a last resort).
    A duplicate message is harmless: the claim turns it into a no-op.
    """
    now = func.now()
    grace = timedelta(seconds=grace_seconds)
    rows = session.execute(
        _waiting(Shard.job_id, Shard.shard_no, Shard.queue)
        .where(
            or_(
                and_(Shard.enqueued_at.is_(None), Job.created_at < now - grace),
                and_(Shard.queue.in_(list(idle_queues)), Shard.enqueued_at < now - grace),
                Shard.enqueued_at < now - timedelta(seconds=stale_seconds),
            ),
        )
        .order_by(Job.created_at, Shard.shard_no)
        .limit(5000)
    ).all()
    return [(job_id, shard_no, queue) for job_id, shard_no, queue in rows]


def unwritten_result_shards(
    *, session: Session, grace_seconds: float, limit: int = 200
) -> list[tuple[uuid.UUID, int]]:
    """Done shards whose S3 result object was never written (the worker died right after its
    commit), older than `grace_seconds`; none of a job being deleted (the purge removes those)."""
    rows = session.execute(
        select(Shard.job_id, Shard.shard_no)
        .join(Job, Job.id == Shard.job_id)
        .where(
            Shard.state == ShardState.done,
            Shard.results_written_at.is_(None),
            Shard.finished_at < func.now() - timedelta(seconds=grace_seconds),
            Job.deleted_at.is_(None),
        )
        .limit(limit)
    ).all()
    return [(job_id, shard_no) for job_id, shard_no in rows]


def drain_rates(
    *, session: Session, now: datetime, window: float
) -> tuple[dict[str, float], float | None]:
    """Docs/s finished over the window on each GPU queue, and on spill (None: nothing finished).

    A route that started working within the window is measured from its first start, not over
    the whole window, so the first ticks of a burst do not read it as slower than it is."""
    since = now - timedelta(seconds=window)
    rows = session.execute(
        select(Shard.route, Shard.queue, func.sum(Shard.doc_count), func.min(Shard.started_at))
        .where(
            Shard.route.in_(("gpu", "spill")),
            Shard.state == ShardState.done,
            Shard.finished_at >= since,
        )
        .group_by(Shard.route, Shard.queue)
    ).all()

    def rate(docs: int, first: datetime | None) -> float:
        start = max(first, since) if first is not None else since
        return docs / max((now - start).total_seconds(), MIN_RATE_SPAN_S)

    gpu = {q: rate(int(docs), first) for route, q, docs, first in rows if route == "gpu" and docs}
    spill = [(int(docs), first) for route, _, docs, first in rows if route == "spill" and docs]
    if not spill:
        return gpu, None
    starts = [first for _, first in spill if first is not None]
    return gpu, rate(sum(docs for docs, _ in spill), min(starts) if starts else None)


def unclaimed_by_job(
    *, session: Session, job_ids: list[uuid.UUID]
) -> dict[uuid.UUID, list[tuple[int, int]]]:
    """(shard_no, docs) of each job's unclaimed shards that wait for the GPUs, in order."""
    out: dict[uuid.UUID, list[tuple[int, int]]] = {}
    if not job_ids:
        return out
    rows = session.execute(
        select(Shard.job_id, Shard.shard_no, Shard.doc_count)
        .where(
            Shard.job_id.in_(job_ids),
            Shard.state.in_(SHARD_CLAIMABLE),
            Shard.queue != QUEUE_SPILL,
        )
        .order_by(Shard.job_id, Shard.shard_no)
    ).all()
    for job_id, shard_no, docs in rows:
        out.setdefault(job_id, []).append((shard_no, docs))
    return out


def running_docs(*, session: Session) -> dict[str, int]:
    """Documents of shards being worked, per queue (each GPU queue, and spill)."""
    rows = session.execute(
        select(Shard.queue, func.sum(Shard.doc_count))
        .where(Shard.state == ShardState.running)
        .group_by(Shard.queue)
    ).all()
    return {queue: int(docs) for queue, docs in rows}


def spill_backlog(*, session: Session) -> list[tuple[uuid.UUID, int, int]]:
    """Unclaimed shards of active jobs in the spill queue, as (job_id, shard_no, docs), in the
    order spill workers take them: by publish time, the not yet published last."""
    rows = session.execute(
        _waiting(Shard.job_id, Shard.shard_no, Shard.doc_count)
        .where(Shard.queue == QUEUE_SPILL)
        .order_by(Shard.enqueued_at.asc().nulls_last(), Job.created_at, Shard.shard_no)
    ).all()
    return [(job_id, shard_no, docs) for job_id, shard_no, docs in rows]


def spill_spend(*, session: Session, job_id: uuid.UUID) -> tuple[int, int, int]:
    """A job's spill route so far: (docs committed to it and not done, tokens in and out done)."""
    committed_docs, done_in, done_out = session.execute(
        select(
            func.coalesce(func.sum(Shard.doc_count).filter(Shard.state != ShardState.done), 0),
            func.coalesce(func.sum(Shard.tokens_in).filter(Shard.state == ShardState.done), 0),
            func.coalesce(func.sum(Shard.tokens_out).filter(Shard.state == ShardState.done), 0),
        ).where(Shard.job_id == job_id, Shard.queue == QUEUE_SPILL)
    ).one()
    # Postgres sums of integers come back as Decimal.
    return int(committed_docs), int(done_in), int(done_out)
