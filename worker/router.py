"""Beat task: decide which not-yet-claimed shards go to the managed API (the `spill` queue).

- `always`: every unclaimed shard spills. `never`: none, ever.
- `auto`: all unclaimed shards spill when no GPU worker serving the job's model has sent a heartbeat
  for `gpu_dead_after` seconds. Otherwise, for a job with a deadline, the GPU drain rate (documents
  finished on the GPU route over the last `router_drain_window_seconds`) and the documents ahead of
  it in its queue say how many of its documents the GPUs can finish in time; the rest (the last,
  marginal shards) spill.
- `max_spill_cost` caps what a job may spend: spilled shards are costed with the job's estimate,
  and past the cap the job waits for the GPUs and says so in `router_note`.

Moving a shard is a compare-and-set on its queue (only while it is unclaimed), and a worker only
claims shards of its own route, so a shard is never worked by both. Running the task twice is safe.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from celery import Celery
from kombu.exceptions import OperationalError as BrokerError
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from postroom.costs import spill_cost
from postroom.db.models import Job, Shard, Worker
from postroom.domain import JOB_ACTIVE, SHARD_CLAIMABLE, ShardState
from postroom.jobs import mark_published
from postroom.metrics import ROUTER_DECISIONS, SPILLED_SHARDS
from postroom.queue import QUEUE_SPILL, gpu_queue, publish_shard
from postroom.settings import Settings

logger = logging.getLogger(__name__)
BUDGET_MARGIN = 1.25


@dataclass
class Decision:
    job_id: uuid.UUID
    shards: list[int]
    docs: int
    reason: str


def plan_deadline(
    unclaimed: list[tuple[int, int]], *, ahead: int, rate: float, seconds_left: float
) -> tuple[list[int], int]:
    """Keep the first shards the GPUs can finish in time; return (shards to spill, docs kept).

    `unclaimed` is (shard_no, docs) in queue order; `ahead` documents are before them.
    """
    capacity = rate * max(seconds_left, 0.0) - ahead
    kept = 0
    spill: list[int] = []
    for shard_no, docs in unclaimed:
        if not spill and kept + docs <= capacity:
            kept += docs
        else:
            spill.append(shard_no)
    return spill, kept


def route_tick(
    *, sessions: sessionmaker[Session], celery: Celery, settings: Settings
) -> list[Decision]:
    now = datetime.now(UTC)
    with sessions() as session:
        alive = _alive_aliases(session, now - timedelta(seconds=settings.gpu_dead_after))
        rates = _drain_rates(session, now, settings.router_drain_window_seconds)
        jobs = session.execute(
            select(
                Job.id,
                Job.model,
                Job.spill,
                Job.deadline,
                Job.max_spill_cost,
                Job.estimate,
                Job.created_at,
            )
            .where(Job.status.in_(JOB_ACTIVE), Job.spill != "never")
            .order_by(Job.created_at)
        ).all()
        waiting = _unclaimed(session, [j.id for j in jobs])
        running = _running_docs(session)
    decisions: list[Decision] = []
    ahead: dict[str, int] = dict(running)
    for job in jobs:
        queue = gpu_queue(job.model)
        shards = waiting.get(job.id, [])
        if not shards:
            continue
        reason = ""
        to_spill: list[int] = []
        if job.spill == "always":
            to_spill, reason = [s for s, _ in shards], "always: the job's policy"
        elif job.model not in alive:
            to_spill = [s for s, _ in shards]
            reason = (
                f"gpu down: no worker for {job.model!r} sent a heartbeat in "
                f"{settings.gpu_dead_after}s"
            )
        elif job.deadline is not None and rates.get(queue):
            seconds_left = (job.deadline - now).total_seconds()
            to_spill, kept = plan_deadline(
                shards, ahead=ahead.get(queue, 0), rate=rates[queue], seconds_left=seconds_left
            )
            ahead[queue] = ahead.get(queue, 0) + kept
            reason = (
                f"deadline: due in {seconds_left:.0f}s: GPUs drain {rates[queue]:.1f} docs/s with "
                f"{ahead.get(queue, 0)} docs ahead"
            )
        else:
            ahead[queue] = ahead.get(queue, 0) + sum(d for _, d in shards)
        if not to_spill:
            continue
        to_spill, note = _within_budget(sessions, settings, job, dict(shards), to_spill)
        if to_spill:
            decisions.append(_spill(sessions, celery, job.id, to_spill, dict(shards), reason))
        _note(sessions, job.id, note)
    return decisions


def _alive_aliases(session: Session, since: datetime) -> set[str]:
    rows = session.scalars(
        select(Worker.models).where(Worker.route == "gpu", Worker.heartbeat_at >= since)
    ).all()
    return {alias for models in rows for alias in models}


def _drain_rates(session: Session, now: datetime, window: float) -> dict[str, float]:
    rows = session.execute(
        select(Shard.queue, func.sum(Shard.doc_count))
        .where(
            Shard.route == "gpu",
            Shard.state == ShardState.done,
            Shard.finished_at >= now - timedelta(seconds=window),
        )
        .group_by(Shard.queue)
    ).all()
    return {queue: float(docs) / window for queue, docs in rows if docs}


def _unclaimed(
    session: Session, job_ids: list[uuid.UUID]
) -> dict[uuid.UUID, list[tuple[int, int]]]:
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


def _running_docs(session: Session) -> dict[str, int]:
    rows = session.execute(
        select(Shard.queue, func.sum(Shard.doc_count))
        .where(Shard.state == ShardState.running, Shard.queue != QUEUE_SPILL)
        .group_by(Shard.queue)
    ).all()
    return {queue: int(docs) for queue, docs in rows}


def _within_budget(
    sessions: sessionmaker[Session],
    settings: Settings,
    job: Any,
    docs_by_shard: dict[int, int],
    to_spill: list[int],
) -> tuple[list[int], str | None]:
    if job.max_spill_cost is None:
        return to_spill, None
    # Estimates are made before anything is tokenised: leave a margin so the cap holds.
    per_doc = float((job.estimate or {}).get("tokens_per_doc", 0.0)) * BUDGET_MARGIN
    with sessions() as session:
        committed_docs, done_in, done_out = session.execute(
            select(
                func.coalesce(func.sum(Shard.doc_count).filter(Shard.state != ShardState.done), 0),
                func.coalesce(func.sum(Shard.tokens_in).filter(Shard.state == ShardState.done), 0),
                func.coalesce(func.sum(Shard.tokens_out).filter(Shard.state == ShardState.done), 0),
            ).where(Shard.job_id == job.id, Shard.queue == QUEUE_SPILL)
        ).one()
    # Postgres sums of integers come back as Decimal.
    committed_docs, done_in, done_out = int(committed_docs), int(done_in), int(done_out)
    committed = spill_cost(settings, tokens_in=done_in, tokens_out=done_out) + spill_cost(
        settings, tokens_in=committed_docs * per_doc, tokens_out=committed_docs * 5
    )
    allowed: list[int] = []
    for shard_no in to_spill:
        docs = docs_by_shard[shard_no]
        cost = spill_cost(settings, tokens_in=docs * per_doc, tokens_out=docs * 5)
        if committed + cost > job.max_spill_cost:
            break
        committed += cost
        allowed.append(shard_no)
    if len(allowed) < len(to_spill):
        left = sum(docs_by_shard[s] for s in to_spill[len(allowed) :])
        return allowed, (
            f"waiting for GPUs: spilling {left} more documents would pass max_spill_cost "
            f"${job.max_spill_cost:g} (committed ${committed:.4f})"
        )
    return allowed, None


def _spill(
    sessions: sessionmaker[Session],
    celery: Celery,
    job_id: uuid.UUID,
    shard_nos: list[int],
    docs_by_shard: dict[int, int],
    reason: str,
) -> Decision:
    with sessions.begin() as session:
        moved = session.scalars(
            update(Shard)
            .where(
                Shard.job_id == job_id,
                Shard.shard_no.in_(shard_nos),
                Shard.state.in_(SHARD_CLAIMABLE),
                Shard.queue != QUEUE_SPILL,
            )
            .values(queue=QUEUE_SPILL, enqueued_at=None)
            .returning(Shard.shard_no)
        ).all()
    published = []
    try:
        for shard_no in moved:
            publish_shard(celery, job_id=str(job_id), shard_no=shard_no, queue=QUEUE_SPILL)
            published.append((job_id, shard_no))
    except (BrokerError, OSError) as e:  # the reaper publishes the rest (enqueued_at is NULL)
        logger.warning("router: publishing to spill stopped: %s", e)
    if published:
        with sessions.begin() as session:
            mark_published(session=session, shards=published)
    docs = sum(docs_by_shard[s] for s in moved)
    kind = reason.split(":")[0]
    ROUTER_DECISIONS.labels(decision="spill", reason=kind).inc()
    SPILLED_SHARDS.inc(len(moved))
    logger.info(
        "router: job %s: %d shards (%d docs) to spill: %s", job_id, len(moved), docs, reason
    )
    return Decision(job_id=job_id, shards=list(moved), docs=docs, reason=reason)


def _note(sessions: sessionmaker[Session], job_id: uuid.UUID, note: str | None) -> None:
    with sessions.begin() as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id, Job.router_note.is_distinct_from(note))
            .values(router_note=note)
        )
    if note:
        ROUTER_DECISIONS.labels(decision="hold", reason="max_spill_cost").inc()
        logger.info("router: job %s: %s", job_id, note)
