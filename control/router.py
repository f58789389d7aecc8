"""The router, a task of `postroom beat`: decide which not-yet-claimed shards wait for the GPUs and
which go to the managed API (the `spill` queue), and take spilled shards back when the GPUs would
finish them sooner.

- `always`: every unclaimed shard spills. `never`: none, ever.
- `auto`: all unclaimed shards spill when no GPU worker serving the job's model has sent a heartbeat
  for `gpu_dead_after` seconds. Otherwise a shard goes where it would finish sooner. Each route's
  drain rate is measured (documents finished on it in the last `router_drain_window_seconds`);
  spill's is at least the capacity its workers report (slots over seconds a call holds one), as a
  route that is sent little drains little; a shard's finish on a route is (documents ahead of it
  there + its own) / that rate. A shard of a job with a deadline stays on the GPUs if they finish
  it in time; if not, it spills only when the managed API would finish it `router_spill_margin`
  times sooner (until spill has finished something in the window or reported a capacity, it
  counts as instant: what the GPUs cannot finish in time spills).
  Each tick, unclaimed spilled shards of `auto` jobs whose GPUs are up come back, from the end of
  the spill backlog, while the GPUs would finish them `router_spill_margin` times sooner, so the
  GPUs never idle while a slower managed API drains a deep queue. The margin on both sides keeps
  a shard moved one way from moving back with the same numbers.
- Spill must be up for any of that: a spill worker has sent a heartbeat within `gpu_dead_after`
  seconds and not every live one reports its circuit breaker open. While spill is down, no
  deadline work spills (the job's `router_note` says the deadline is at risk and why) and every
  unclaimed spilled shard of an `auto` job whose GPUs are up goes back to them. A job whose GPUs
  are down, or whose policy is `always`, still spills: nothing else could run it.
- Triage: a deadline job that misses its deadline even split between the routes at their rates
  (`route_plans.misses_deadline`; for a `never` job, on the GPUs alone) is marked
  `deadline_lost`. Nothing of it spills, it is left out of the GPU backlog the next jobs are
  planned behind, and the claim policy runs it after the jobs that can still meet theirs; a later
  tick takes the verdict back if the deadline comes within reach.
- `max_spill_cost` caps what a job may spend: spilled shards are costed with the job's estimate,
  and past the cap the job waits for the GPUs and says so in `router_note`.

Moving a shard is a compare-and-set on its queue (only while it is unclaimed and still on the route
it leaves, `postroom.shards.move_unclaimed`), and a worker only claims shards of its own route
(`postroom.shards.claim_shard`), so a shard is never worked by both. Running the task twice is safe.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from control.route_plans import Spilled, misses_deadline, plan_deadline, plan_take_back
from postroom.backlog import drain_rates, running_docs, spill_backlog, spill_spend, unclaimed_by_job
from postroom.costs import spill_cost
from postroom.db.models import Worker
from postroom.jobs import active_jobs, set_router_note
from postroom.metrics import ROUTER_DECISIONS, SPILLED_SHARDS
from postroom.queue import QUEUE_SPILL, Celery, gpu_queue, publish_and_record
from postroom.settings import Settings
from postroom.shards import move_unclaimed

logger = logging.getLogger(__name__)
BUDGET_MARGIN = 1.25


@dataclass
class Decision:
    job_id: uuid.UUID
    shards: list[int]
    docs: int
    reason: str
    action: str = "spill"  # or "take_back"


@dataclass
class _Tick:
    """What one tick sees, kept current as it moves shards: a job's plan counts what the jobs
    before it left on the GPUs or sent to spill."""

    now: datetime
    alive: set[str]
    rates: dict[str, float]
    spill_rate: float | None
    jobs: list[Any]
    waiting: dict[uuid.UUID, list[tuple[int, int]]]
    ahead: dict[str, int]  # documents waiting or running on each GPU queue
    homes: dict[uuid.UUID, str]  # the GPU queue a spilled shard of the job may go back to
    backlog: list[Spilled]
    spill_running: int
    spill_docs: int
    spill_down: str | None  # why spill cannot take work now; None: it can

    @property
    def spill_says(self) -> str:
        if self.spill_rate:
            return f"spill drains {self.spill_rate:.1f} docs/s"
        return "spill not measured yet"


def route_tick(
    *, sessions: sessionmaker[Session], celery: Celery, settings: Settings
) -> list[Decision]:
    """Spill what should spill, then take back what the GPUs would finish sooner."""
    with sessions() as session:
        tick = _look(session, settings, datetime.now(UTC))
    decisions: list[Decision] = []
    for job in tick.jobs:
        decision = _route_job(tick, job, sessions=sessions, celery=celery, settings=settings)
        if decision is not None:
            decisions.append(decision)
    decisions += _take_back_all(
        tick, sessions=sessions, celery=celery, margin=settings.router_spill_margin
    )
    return decisions


def _look(session: Session, settings: Settings, now: datetime) -> _Tick:
    since = now - timedelta(seconds=settings.gpu_dead_after)
    alive = _alive_aliases(session, since)
    rates, measured = drain_rates(
        session=session, now=now, window=settings.router_drain_window_seconds
    )
    spill_down, capacity = _spill_health(session, since, settings.gpu_dead_after)
    # Spill's drain rate is what it was sent; while it is not full, its capacity says more.
    spill_rate = max(measured or 0.0, capacity) or None
    jobs = active_jobs(session=session)
    waiting = unclaimed_by_job(session=session, job_ids=[j.id for j in jobs])
    ahead = running_docs(session=session)
    spilled = spill_backlog(session=session)
    # The GPU queue a spilled shard may go back to: only `auto` jobs whose GPUs are up.
    homes = {j.id: gpu_queue(j.model) for j in jobs if j.spill == "auto" and j.model in alive}
    backlog = [Spilled(job_id, no, docs, homes.get(job_id)) for job_id, no, docs in spilled]
    spill_running = ahead.pop(QUEUE_SPILL, 0)
    return _Tick(
        now=now,
        alive=alive,
        rates=rates,
        spill_rate=spill_rate,
        jobs=jobs,
        waiting=waiting,
        ahead=ahead,
        homes=homes,
        backlog=backlog,
        spill_running=spill_running,
        spill_docs=spill_running + sum(s.docs for s in backlog),
        spill_down=spill_down,
    )


@dataclass
class _Plan:
    to_spill: list[int]
    reason: str = ""
    held: str | None = None  # why shards that should spill wait for the GPUs (spill is down)
    lost: bool = False  # the deadline is missed on every route: the job runs after the others


def _plan_spill(tick: _Tick, job: Any, settings: Settings) -> _Plan:
    """The shards of one job that should spill, and why."""
    shards = tick.waiting.get(job.id, [])
    if job.spill == "always":
        return _Plan([s for s, _ in shards], "always: the job's policy")
    if job.spill == "auto" and job.model not in tick.alive:
        return _Plan(
            [s for s, _ in shards],
            f"gpu down: no worker for {job.model!r} sent a heartbeat in {settings.gpu_dead_after}s",
        )
    queue = gpu_queue(job.model)
    rate = tick.rates.get(queue)
    if job.deadline is None or not rate:
        return _Plan([])
    seconds_left = (job.deadline - tick.now).total_seconds()
    ahead = tick.ahead.get(queue, 0)
    gpus_say = f"GPUs drain {rate:.1f} docs/s with {ahead} docs ahead"
    if job.spill == "never":
        docs = sum(d for _, d in shards)
        if misses_deadline(kept=docs, spilled=0, ahead=ahead, rate=rate, seconds_left=seconds_left):
            return _lost(seconds_left, f"{gpus_say}; the job may not spill")
        return _Plan([])
    to_spill, kept = plan_deadline(
        shards,
        ahead=ahead,
        rate=rate,
        seconds_left=seconds_left * settings.router_deadline_headroom,
        spill_ahead=tick.spill_docs,
        spill_rate=tick.spill_rate,
        margin=settings.router_spill_margin,
    )
    spilled = sum(d for s, d in shards if s in set(to_spill))
    if to_spill and tick.spill_down:
        lost = misses_deadline(
            kept=kept + spilled, spilled=0, ahead=ahead, rate=rate, seconds_left=seconds_left
        )
        held = f"deadline at risk: {spilled} documents would spill, but {tick.spill_down}"
        return _Plan([], held=held, lost=lost)
    if misses_deadline(
        kept=kept,
        spilled=spilled,
        ahead=ahead,
        rate=rate,
        seconds_left=seconds_left,
        spill_ahead=tick.spill_docs,
        spill_rate=tick.spill_rate,
    ):
        return _lost(
            seconds_left, f"{gpus_say}; {tick.spill_says} with {tick.spill_docs} docs ahead"
        )
    return _Plan(
        to_spill,
        f"deadline: due in {seconds_left:.0f}s: {gpus_say}; {tick.spill_says} with "
        f"{tick.spill_docs} docs ahead",
    )


def _lost(seconds_left: float, why: str) -> _Plan:
    """Triage: a job that misses its deadline on every route spills nothing (it would not be
    saved), and runs after the jobs that can still meet theirs (postroom.policy), which it would
    otherwise make miss theirs too."""
    return _Plan(
        [],
        held=f"deadline lost: due in {seconds_left:.0f}s; {why}; it runs after the jobs that can "
        "still meet theirs",
        lost=True,
    )


def _route_job(
    tick: _Tick,
    job: Any,
    *,
    sessions: sessionmaker[Session],
    celery: Celery,
    settings: Settings,
) -> Decision | None:
    """Spill what `_plan_spill` chose within the job's budget, and count what stays."""
    docs_by_shard = dict(tick.waiting.get(job.id, []))
    plan = _plan_spill(tick, job, settings)
    decision: Decision | None = None
    note = plan.held
    if plan.to_spill:
        to_spill, note = _within_budget(sessions, settings, job, docs_by_shard, plan.to_spill)
        if to_spill:
            spilling = {s: docs_by_shard[s] for s in to_spill}
            decision = _move(
                sessions, celery, job.id, spilling, to_queue=QUEUE_SPILL, reason=plan.reason
            )
            tick.spill_docs += decision.docs
            home = tick.homes.get(job.id)
            tick.backlog += [Spilled(job.id, s, docs_by_shard[s], home) for s in decision.shards]
    if note or plan.to_spill or job.router_note is not None or plan.lost != job.deadline_lost:
        # Said again each tick while it holds (the hold is counted), cleared once it does not.
        _note(sessions, job.id, note, deadline_lost=plan.lost)
    moved = decision.shards if decision is not None else []
    # What stays waits on the GPU queue, ahead of the next job's shards; a lost job's waits
    # behind them all.
    if not plan.lost:
        queue = gpu_queue(job.model)
        stays = sum(docs_by_shard.values()) - sum(docs_by_shard[s] for s in moved)
        tick.ahead[queue] = tick.ahead.get(queue, 0) + stays
    return decision


def _take_back_all(
    tick: _Tick, *, sessions: sessionmaker[Session], celery: Celery, margin: float
) -> list[Decision]:
    back = plan_take_back(
        tick.backlog,
        running=tick.spill_running,
        spill_rate=tick.spill_rate,
        ahead=tick.ahead,
        rates=tick.rates,
        margin=margin,
        spill_down=tick.spill_down is not None,
    )
    by_job: dict[uuid.UUID, list[Spilled]] = {}
    for shard in back:
        by_job.setdefault(shard.job_id, []).append(shard)
    decisions: list[Decision] = []
    for job_id, taken in by_job.items():
        home = taken[0].home or ""
        gpu_says = (
            f"GPUs ({home}) drain {tick.rates[home]:.1f} docs/s with "
            f"{tick.ahead.get(home, 0)} docs ahead"
            if tick.rates.get(home)
            else f"GPUs ({home}) idle, not measured yet"
        )
        reason = (
            f"spill down: {tick.spill_down}"
            if tick.spill_down
            else f"gpu sooner: {gpu_says}; {tick.spill_says} with {tick.spill_docs} docs ahead"
        )
        shards = {s.shard_no: s.docs for s in taken}
        decisions.append(_move(sessions, celery, job_id, shards, to_queue=home, reason=reason))
    return decisions


def _alive_aliases(session: Session, since: datetime) -> set[str]:
    """Aliases served by a GPU worker whose heartbeat is not older than `since`."""
    rows = session.scalars(
        select(Worker.models).where(Worker.route == "gpu", Worker.heartbeat_at >= since)
    ).all()
    return {alias for models in rows for alias in models}


def _spill_health(session: Session, since: datetime, dead_after: int) -> tuple[str | None, float]:
    """Why the spill route cannot take work now (None when it can), and the docs/s its live
    workers with a closed breaker report they finish when full (0: none reported yet)."""
    stats = session.scalars(
        select(Worker.stats).where(Worker.route == "spill", Worker.heartbeat_at >= since)
    ).all()
    spill = [(s or {}).get("spill") or {} for s in stats]
    up = [w for w in spill if not w.get("breaker_open")]
    capacity = sum(float(w.get("capacity_docs_per_s") or 0.0) for w in up)
    if not stats:
        return f"no spill worker sent a heartbeat in {dead_after}s", 0.0
    if not up:
        return (
            f"the managed API keeps failing: all {len(stats)} spill workers' breakers are open",
            0.0,
        )
    return None, capacity


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
        committed_docs, done_in, done_out = spill_spend(session=session, job_id=job.id)
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
    shards: dict[int, int],
    *,
    to_queue: str,
    reason: str,
) -> Decision:
    """Move unclaimed shards (shard_no: docs) between routes and ring the doorbell on the new queue.

    A compare-and-set (`move_unclaimed`): a shard a worker claimed meanwhile stays where it is, and
    the decision lists only the shards that moved. A shard whose doorbell could not be rung keeps
    `enqueued_at` NULL, and the reaper rings it.
    """
    with sessions.begin() as session:
        moved = move_unclaimed(
            session=session, job_id=job_id, shard_nos=list(shards), to_queue=to_queue
        )
    publish_and_record(celery, sessions, [(job_id, shard_no, to_queue) for shard_no in moved])
    docs = sum(shards[s] for s in moved)
    action = "spill" if to_queue == QUEUE_SPILL else "take_back"
    ROUTER_DECISIONS.labels(decision=action, reason=reason.split(":")[0]).inc()
    if action == "spill":
        SPILLED_SHARDS.inc(len(moved))
    where = "to spill" if action == "spill" else f"back to {to_queue}"
    logger.info(
        "router: job %s: %d shards (%d docs) %s: %s", job_id, len(moved), docs, where, reason
    )
    return Decision(job_id=job_id, shards=moved, docs=docs, reason=reason, action=action)


def _note(
    sessions: sessionmaker[Session], job_id: uuid.UUID, note: str | None, *, deadline_lost: bool
) -> None:
    with sessions.begin() as session:
        set_router_note(session=session, job_id=job_id, note=note, deadline_lost=deadline_lost)
    if note:
        why = note.split(":")[0]
        why = {"deadline at risk": "spill down", "waiting for GPUs": "max_spill_cost"}.get(why, why)
        ROUTER_DECISIONS.labels(decision="hold", reason=why).inc()
        logger.info("router: job %s: %s", job_id, note)
