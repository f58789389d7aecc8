"""The claim policy: which waiting shard of a queue a worker takes when a doorbell rings.

A doorbell (a Celery message) means "a shard of queue Q waits"; the worker that gets it claims
the best claimable shard of Q, in this order:

1. the job's `priority` (`high`, `normal`, `low`; a tenant may not ask above its maximum);
2. earliest deadline first among jobs whose deadline is at risk (due within
   `POSTROOM_POLICY_DEADLINE_HORIZON_SECONDS`); other jobs come after them, and so do jobs whose
   deadline the router found lost on every route (`deadline_lost`: triage, so that under
   overload a hopeless job does not make the jobs behind it miss theirs too);
3. weighted fair share: the tenant with the fewest documents running or finished on the GPUs
   over `POSTROOM_POLICY_FAIR_SHARE_WINDOW_SECONDS`, per unit of its weight, counted in whole
   shards, so tenants within a shard of each other tie;
4. on a tie, a job this worker is already running (its prompt prefix is in the engine's cache),
   so a job's shards stay together on a worker where the policy allows;
5. age (the oldest job first), then the job's lowest shard number.

A tenant at its `shards running at once` quota is passed over. Ranking reads the active jobs
(a few, indexed) and one row per tenant; the shard itself is found through the index on a job's
claimable shards and taken with `FOR UPDATE SKIP LOCKED`, so workers never wait on each other
and the cost does not grow with the number of waiting shards.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import and_, func, literal, or_, select, text, true
from sqlalchemy.orm import Session

from postroom.db.models import Job, Shard, Tenant
from postroom.domain import JOB_ACTIVE, QUEUE_SPILL, SHARD_CLAIMABLE, ShardState
from postroom.settings import Settings
from postroom.shards import Claimed, claim_next_of_job

PRIORITIES = ("high", "normal", "low")


class ClaimContended(Exception):
    """Shards of the queue wait, but none could be claimed now: other transactions hold their
    rows (another worker claiming, a publisher recording its doorbells) or their tenants are at
    the running quota. The doorbell must not be dropped: the worker retries it shortly."""


@dataclass(frozen=True)
class WaitingJob:
    """An active job with a shard of the queue waiting for a claim."""

    id: uuid.UUID
    tenant_id: uuid.UUID
    priority: str
    deadline: datetime | None
    created_at: datetime
    shard_count: int
    deadline_lost: bool = False


@dataclass(frozen=True)
class TenantLoad:
    """What fair share and the running quota weigh of a tenant."""

    weight: float
    running_shards: int
    recent_docs: int
    max_running: int  # 0: no limit


def waiting_jobs(*, session: Session, queue: str) -> list[WaitingJob]:
    """Active jobs with a claimable shard of `queue` that is claimed by policy (not a suspect).

    A LATERAL probe with LIMIT 1 per active job, so Postgres looks up one entry of the partial
    index on claimable shards per job instead of hashing every waiting shard."""
    first = (
        select(literal(1).label("one"))
        .where(
            Shard.job_id == Job.id,
            Shard.queue == queue,
            Shard.state.in_(SHARD_CLAIMABLE),
            Shard.attempt == Shard.releases,
            Shard.shard_no < Job.shard_count,
        )
        # In index order, so the probe stops at the first entry instead of a bitmap of all.
        .order_by(Shard.shard_no)
        .limit(1)
        .lateral("first_shard")
    )
    rows = session.execute(
        select(
            Job.id,
            Job.tenant_id,
            Job.priority,
            Job.deadline,
            Job.created_at,
            Job.shard_count,
            Job.deadline_lost,
        )
        .join(first, true())
        .where(Job.status.in_(JOB_ACTIVE))
    ).all()
    return [WaitingJob(*row) for row in rows]


def tenant_loads(
    *, session: Session, tenant_ids: Collection[uuid.UUID], settings: Settings
) -> dict[uuid.UUID, TenantLoad]:
    """Each tenant's weight, shards running now, and documents on the GPUs recently."""
    if not tenant_ids:
        return {}
    since = func.now() - timedelta(seconds=settings.policy_fair_share_window_seconds)
    usage = {
        tenant_id: (int(running), int(docs))
        for tenant_id, running, docs in session.execute(
            select(
                Job.tenant_id,
                func.count().filter(Shard.state == ShardState.running),
                func.coalesce(func.sum(Shard.doc_count).filter(Shard.queue != QUEUE_SPILL), 0),
            )
            .join(Job, Job.id == Shard.job_id)
            .where(
                Job.tenant_id.in_(list(tenant_ids)),
                or_(
                    Shard.state == ShardState.running,
                    and_(Shard.state == ShardState.done, Shard.finished_at >= since),
                ),
            )
            .group_by(Job.tenant_id)
        ).all()
    }
    rows = session.execute(
        select(Tenant.id, Tenant.weight, Tenant.quota_running_shards).where(
            Tenant.id.in_(list(tenant_ids))
        )
    ).all()
    loads = {}
    for tenant_id, weight, max_running in rows:
        running, docs = usage.get(tenant_id, (0, 0))
        loads[tenant_id] = TenantLoad(
            weight=weight if weight else settings.tenant_weight,
            running_shards=running,
            recent_docs=docs,
            max_running=settings.quota_running_shards if max_running is None else max_running,
        )
    return loads


def rank_jobs(
    jobs: Sequence[WaitingJob],
    loads: dict[uuid.UUID, TenantLoad],
    *,
    now: datetime,
    settings: Settings,
    prefer: Collection[uuid.UUID] = (),
) -> list[WaitingJob]:
    """The jobs in the order their shards should be claimed (see the module docstring); jobs of
    a tenant at its running quota are left out."""
    horizon = now + timedelta(seconds=settings.policy_deadline_horizon_seconds)
    default = TenantLoad(settings.tenant_weight, 0, 0, settings.quota_running_shards)

    def key(job: WaitingJob) -> tuple[int, float, int, int, datetime, str]:
        load = loads.get(job.tenant_id, default)
        at_risk = job.deadline is not None and job.deadline <= horizon and not job.deadline_lost
        deadline = job.deadline.timestamp() if at_risk and job.deadline else math.inf
        share = math.floor(load.recent_docs / load.weight / settings.shard_size)
        priority = PRIORITIES.index(job.priority) if job.priority in PRIORITIES else 1
        return (
            priority,
            deadline,
            share,
            0 if job.id in prefer else 1,
            job.created_at,
            str(job.id),
        )

    def capped(job: WaitingJob) -> bool:
        load = loads.get(job.tenant_id, default)
        return bool(load.max_running) and load.running_shards >= load.max_running

    return sorted((job for job in jobs if not capped(job)), key=key)


def claim_best(
    *,
    session: Session,
    queue: str,
    worker: str,
    lease_seconds: int,
    route: str,
    settings: Settings,
    prefer: Collection[uuid.UUID] = (),
) -> tuple[uuid.UUID, int, Claimed] | None:
    """Claim the best claimable shard of `queue` for this worker, in the caller's transaction;
    None when nothing of the queue is claimable by policy on this route.

    Returns (job_id, shard_no, claimed). Raises ClaimContended when shards wait but none could be
    taken now (SKIP LOCKED skipped them, or their tenants are at quota), so the doorbell is kept.
    A worker of route R only claims shards whose queue is R's, so the router's moves between
    routes (postroom.shards.move_unclaimed) stay safe.
    """
    if (queue == QUEUE_SPILL) != (route == "spill"):
        return None
    # The planner prices the per-job probes as if most index entries were filtered out, which
    # crosses jit_above_cost at a large backlog; compiling costs ~10 ms, running ~1 ms.
    session.execute(text("SET LOCAL jit = off"))
    jobs = waiting_jobs(session=session, queue=queue)
    if not jobs:
        return None
    loads = tenant_loads(
        session=session, tenant_ids={job.tenant_id for job in jobs}, settings=settings
    )
    ranked = rank_jobs(jobs, loads, now=datetime.now(UTC), settings=settings, prefer=prefer)
    for job in ranked[: settings.policy_candidate_jobs]:
        got = claim_next_of_job(
            session=session,
            job_id=job.id,
            queue=queue,
            shard_count=job.shard_count,
            worker=worker,
            lease_seconds=lease_seconds,
            route=route,
        )
        if got is not None:
            return job.id, got[0], got[1]
    raise ClaimContended(f"{len(jobs)} job(s) wait on {queue} but no shard could be taken now")
