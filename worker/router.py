"""Beat task: decide which not-yet-claimed shards wait for the GPUs and which go to the managed API
(the `spill` queue), and take spilled shards back when the GPUs would finish them sooner.

- `always`: every unclaimed shard spills. `never`: none, ever.
- `auto`: all unclaimed shards spill when no GPU worker serving the job's model has sent a heartbeat
  for `gpu_dead_after` seconds. Otherwise a shard goes where it would finish sooner. Each route's
  drain rate is measured (documents finished on it in the last `router_drain_window_seconds`); a
  shard's finish on a route is (documents ahead of it there + its own) / that rate. A shard of a
  job with a deadline stays on the GPUs if they finish it in time; if not, it spills only when the
  managed API would finish it `router_spill_margin` times sooner (until spill has finished
  something in the window it counts as instant: what the GPUs cannot finish in time spills).
  Each tick, unclaimed spilled shards of `auto` jobs whose GPUs are up come back, from the end of
  the spill backlog, while the GPUs would finish them `router_spill_margin` times sooner, so the
  GPUs never idle while a slower managed API drains a deep queue. The margin on both sides keeps
  a shard moved one way from moving back with the same numbers.
- `max_spill_cost` caps what a job may spend: spilled shards are costed with the job's estimate,
  and past the cap the job waits for the GPUs and says so in `router_note`.

Moving a shard is a compare-and-set on its queue (only while it is unclaimed and still on the route
it leaves), and a worker only claims shards of its own route (`postroom.jobs.claim_shard`), so a
shard is never worked by both. Running the task twice is safe.
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
MIN_RATE_SPAN_S = 1.0  # a rate is never measured over less than this


@dataclass
class Decision:
    job_id: uuid.UUID
    shards: list[int]
    docs: int
    reason: str
    action: str = "spill"  # or "take_back"


@dataclass(frozen=True)
class Spilled:
    """An unclaimed shard in the spill queue; `home` is the GPU queue it may go back to (None: it
    stays, because its job is `always` or its GPUs are down)."""

    job_id: uuid.UUID
    shard_no: int
    docs: int
    home: str | None


def plan_deadline(
    unclaimed: list[tuple[int, int]],
    *,
    ahead: int,
    rate: float,
    seconds_left: float,
    spill_ahead: int = 0,
    spill_rate: float | None = None,
    margin: float = 1.0,
) -> tuple[list[int], int]:
    """Choose which shards of one job spill; return (shards to spill, docs kept on the GPUs).

    `unclaimed` is (shard_no, docs) in queue order. `ahead` documents are before them on the GPUs,
    which drain `rate` docs/s; `spill_ahead` documents wait or run on the spill route, which drains
    `spill_rate` docs/s (None: not measured yet, so spill counts as instant). A shard the GPUs
    finish before the deadline stays; one they do not spills only if spill would finish it `margin`
    times sooner than the GPUs.
    """
    kept = spilled = 0
    to_spill: list[int] = []
    for shard_no, docs in unclaimed:
        gpu_finish = (ahead + kept + docs) / rate
        if gpu_finish > seconds_left and (
            spill_rate is None or (spill_ahead + spilled + docs) / spill_rate * margin < gpu_finish
        ):
            to_spill.append(shard_no)
            spilled += docs
        else:
            kept += docs
    return to_spill, kept


def plan_take_back(
    backlog: list[Spilled],
    *,
    running: int,
    spill_rate: float | None,
    ahead: dict[str, int],
    rates: dict[str, float],
    margin: float,
) -> list[Spilled]:
    """Choose the spilled shards the GPUs would finish `margin` times sooner than spill would.

    `backlog` is the spill queue's unclaimed shards in the order spill workers take them, behind
    `running` documents being worked there; `ahead` documents wait or run on each GPU queue, which
    drains `rates` docs/s. Shards come back from the end of the backlog (the last that spill would
    reach): a shard's spill finish is the documents up to and including it over `spill_rate`, and
    its GPU finish counts the shards already taken back before it. Before spill is measured,
    nothing comes back that way. An idle live GPU queue with no measured rate (it has done nothing
    for a whole window, e.g. it is back from an outage) gets the last shard meant for it: that
    measures its rate for the next ticks.
    """
    ahead = dict(ahead)
    back: list[Spilled] = []
    for shard in reversed(backlog):
        if shard.home and not rates.get(shard.home) and not ahead.get(shard.home):
            back.append(shard)
            ahead[shard.home] = shard.docs
    if not spill_rate:
        return back
    position = running + sum(shard.docs for shard in backlog)
    for shard in reversed(backlog):
        rate = rates.get(shard.home) if shard.home else None
        if shard.home and rate:
            gpu_finish = (ahead.get(shard.home, 0) + shard.docs) / rate
            if gpu_finish * margin < position / spill_rate:
                back.append(shard)
                ahead[shard.home] = ahead.get(shard.home, 0) + shard.docs
        # Taking a shard back leaves the positions of the shards before it as they were.
        position -= shard.docs
    return back


def route_tick(
    *, sessions: sessionmaker[Session], celery: Celery, settings: Settings
) -> list[Decision]:
    """Spill what should spill, then take back what the GPUs would finish sooner."""
    now = datetime.now(UTC)
    margin = settings.router_spill_margin
    with sessions() as session:
        alive = _alive_aliases(session, now - timedelta(seconds=settings.gpu_dead_after))
        rates, spill_rate = _drain_rates(session, now, settings.router_drain_window_seconds)
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
            .where(Job.status.in_(JOB_ACTIVE))
            .order_by(Job.created_at)
        ).all()
        waiting = _unclaimed(session, [j.id for j in jobs])
        ahead = _running_docs(session)
        spilled = _spill_backlog(session)
    # The GPU queue a spilled shard may go back to: only `auto` jobs whose GPUs are up.
    homes = {j.id: gpu_queue(j.model) for j in jobs if j.spill == "auto" and j.model in alive}
    backlog = [Spilled(job_id, no, docs, homes.get(job_id)) for job_id, no, docs in spilled]
    spill_running = ahead.pop(QUEUE_SPILL, 0)
    spill_docs = spill_running + sum(s.docs for s in backlog)
    spill_says = f"spill drains {spill_rate:.1f} docs/s" if spill_rate else "spill not measured yet"
    decisions: list[Decision] = []
    for job in jobs:
        queue = gpu_queue(job.model)
        shards = waiting.get(job.id, [])
        docs_by_shard = dict(shards)
        reason = ""
        to_spill: list[int] = []
        if job.spill == "never":
            pass
        elif job.spill == "always":
            to_spill, reason = [s for s, _ in shards], "always: the job's policy"
        elif job.model not in alive:
            to_spill = [s for s, _ in shards]
            reason = (
                f"gpu down: no worker for {job.model!r} sent a heartbeat in "
                f"{settings.gpu_dead_after}s"
            )
        elif job.deadline is not None and rates.get(queue):
            seconds_left = (job.deadline - now).total_seconds()
            to_spill, _ = plan_deadline(
                shards,
                ahead=ahead.get(queue, 0),
                rate=rates[queue],
                seconds_left=seconds_left,
                spill_ahead=spill_docs,
                spill_rate=spill_rate,
                margin=margin,
            )
            reason = (
                f"deadline: due in {seconds_left:.0f}s: GPUs drain {rates[queue]:.1f} docs/s "
                f"with {ahead.get(queue, 0)} docs ahead; {spill_says} with {spill_docs} docs ahead"
            )
        moved: list[int] = []
        if to_spill:
            to_spill, note = _within_budget(sessions, settings, job, docs_by_shard, to_spill)
            if to_spill:
                decision = _spill(sessions, celery, job.id, to_spill, docs_by_shard, reason)
                decisions.append(decision)
                moved = decision.shards
                spill_docs += decision.docs
                backlog += [Spilled(job.id, s, docs_by_shard[s], homes.get(job.id)) for s in moved]
            _note(sessions, job.id, note)
        # What stays waits on the GPU queue, ahead of the next job's shards.
        stays = sum(docs_by_shard.values()) - sum(docs_by_shard[s] for s in moved)
        ahead[queue] = ahead.get(queue, 0) + stays
    back = plan_take_back(
        backlog,
        running=spill_running,
        spill_rate=spill_rate,
        ahead=ahead,
        rates=rates,
        margin=margin,
    )
    by_job: dict[uuid.UUID, list[Spilled]] = {}
    for shard in back:
        by_job.setdefault(shard.job_id, []).append(shard)
    for job_id, taken in by_job.items():
        home = taken[0].home or ""
        gpu_says = (
            f"GPUs ({home}) drain {rates[home]:.1f} docs/s with {ahead.get(home, 0)} docs ahead"
            if rates.get(home)
            else f"GPUs ({home}) idle, not measured yet"
        )
        reason = f"gpu sooner: {gpu_says}; {spill_says} with {spill_docs} docs ahead"
        decisions.append(_take_back(sessions, celery, job_id, taken, home, reason))
    return decisions


def _alive_aliases(session: Session, since: datetime) -> set[str]:
    rows = session.scalars(
        select(Worker.models).where(Worker.route == "gpu", Worker.heartbeat_at >= since)
    ).all()
    return {alias for models in rows for alias in models}


def _drain_rates(
    session: Session, now: datetime, window: float
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
    """Documents of shards being worked, per queue (each GPU queue, and spill)."""
    rows = session.execute(
        select(Shard.queue, func.sum(Shard.doc_count))
        .where(Shard.state == ShardState.running)
        .group_by(Shard.queue)
    ).all()
    return {queue: int(docs) for queue, docs in rows}


def _spill_backlog(session: Session) -> list[tuple[uuid.UUID, int, int]]:
    """Unclaimed shards of active jobs in the spill queue, as (job_id, shard_no, docs), in the
    order spill workers take them: by publish time, the not yet published last."""
    rows = session.execute(
        select(Shard.job_id, Shard.shard_no, Shard.doc_count)
        .join(Job, Job.id == Shard.job_id)
        .where(
            Job.status.in_(JOB_ACTIVE),
            Shard.state.in_(SHARD_CLAIMABLE),
            Shard.queue == QUEUE_SPILL,
        )
        .order_by(Shard.enqueued_at.asc().nulls_last(), Job.created_at, Shard.shard_no)
    ).all()
    return [(job_id, shard_no, docs) for job_id, shard_no, docs in rows]


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


def _move(
    sessions: sessionmaker[Session],
    celery: Celery,
    job_id: uuid.UUID,
    shard_nos: list[int],
    to_queue: str,
) -> list[int]:
    """Move unclaimed shards between routes and ring the doorbell on the new queue.

    A compare-and-set: only shards still unclaimed and still on the other route move, so a shard a
    worker claimed meanwhile stays where it is. Returns the shard numbers that moved.
    """
    leaving = Shard.queue != QUEUE_SPILL if to_queue == QUEUE_SPILL else Shard.queue == QUEUE_SPILL
    with sessions.begin() as session:
        moved = session.scalars(
            update(Shard)
            .where(
                Shard.job_id == job_id,
                Shard.shard_no.in_(shard_nos),
                Shard.state.in_(SHARD_CLAIMABLE),
                leaving,
            )
            .values(queue=to_queue, enqueued_at=None)
            .returning(Shard.shard_no)
        ).all()
    published = []
    try:
        for shard_no in sorted(moved):
            publish_shard(celery, job_id=str(job_id), shard_no=shard_no, queue=to_queue)
            published.append((job_id, shard_no))
    except (BrokerError, OSError) as e:  # the reaper publishes the rest (enqueued_at is NULL)
        logger.warning("router: publishing to %s stopped: %s", to_queue, e)
    if published:
        with sessions.begin() as session:
            mark_published(session=session, shards=published)
    return sorted(moved)


def _spill(
    sessions: sessionmaker[Session],
    celery: Celery,
    job_id: uuid.UUID,
    shard_nos: list[int],
    docs_by_shard: dict[int, int],
    reason: str,
) -> Decision:
    moved = _move(sessions, celery, job_id, shard_nos, QUEUE_SPILL)
    docs = sum(docs_by_shard[s] for s in moved)
    ROUTER_DECISIONS.labels(decision="spill", reason=reason.split(":")[0]).inc()
    SPILLED_SHARDS.inc(len(moved))
    logger.info(
        "router: job %s: %d shards (%d docs) to spill: %s", job_id, len(moved), docs, reason
    )
    return Decision(job_id=job_id, shards=moved, docs=docs, reason=reason)


def _take_back(
    sessions: sessionmaker[Session],
    celery: Celery,
    job_id: uuid.UUID,
    shards: list[Spilled],
    home: str,
    reason: str,
) -> Decision:
    docs_by_shard = {s.shard_no: s.docs for s in shards}
    moved = _move(sessions, celery, job_id, list(docs_by_shard), home)
    docs = sum(docs_by_shard[s] for s in moved)
    ROUTER_DECISIONS.labels(decision="take_back", reason=reason.split(":")[0]).inc()
    logger.info(
        "router: job %s: %d shards (%d docs) back to %s: %s",
        job_id,
        len(moved),
        docs,
        home,
        reason,
    )
    return Decision(job_id=job_id, shards=moved, docs=docs, reason=reason, action="take_back")


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
