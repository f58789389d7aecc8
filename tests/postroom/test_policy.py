"""Claim by policy against real Postgres: a doorbell of a queue claims its best shard by
priority, deadline at risk, weighted fair share, affinity and age; suspects are left to their
own doorbells; a tenant at its running quota is passed over. Each test has a queue of its own,
so other tests' jobs never compete."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, update
from sqlalchemy.orm import Session, sessionmaker

from postroom.db.models import Job, Shard, Tenant
from postroom.policy import ClaimContended, TenantLoad, WaitingJob, claim_best, rank_jobs
from postroom.settings import Settings
from tests.postroom.jobrows import claim, finish, make_job

pytestmark = pytest.mark.usefixtures("stop_jobs_made_here")


def _queue() -> str:
    return f"gpu.p{uuid.uuid4().hex[:10]}"


def _claim_best(
    sessions: sessionmaker[Session],
    settings: Settings,
    queue: str,
    *,
    route: str = "gpu",
    prefer: tuple[uuid.UUID, ...] = (),
) -> tuple[uuid.UUID, int] | None:
    with sessions.begin() as session:
        got = claim_best(
            session=session,
            queue=queue,
            worker="w1",
            lease_seconds=60,
            route=route,
            settings=settings,
            prefer=prefer,
        )
    return None if got is None else (got[0], got[1])


def test_a_later_tenant_goes_before_the_rest_of_a_big_job(
    sessions: sessionmaker[Session], settings: Settings
) -> None:
    queue = _queue()
    big = make_job(sessions, sizes=(100,) * 6, queue=queue)
    # A's first shards are running: its recent work counts against it.
    assert _claim_best(sessions, settings, queue) == (big, 0)
    assert _claim_best(sessions, settings, queue) == (big, 1)
    small = make_job(sessions, sizes=(100, 100), queue=queue)
    assert _claim_best(sessions, settings, queue) == (small, 0)
    assert _claim_best(sessions, settings, queue) == (small, 1)
    assert _claim_best(sessions, settings, queue) == (big, 2)


def test_priority_then_deadline_at_risk_then_age(
    sessions: sessionmaker[Session], settings: Settings
) -> None:
    queue = _queue()
    now = datetime.now(UTC)
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    old = make_job(sessions, sizes=(5,), queue=queue, tenant=tenant)
    far = make_job(
        sessions, sizes=(5,), queue=queue, tenant=tenant, deadline=now + timedelta(days=2)
    )
    late = make_job(
        sessions, sizes=(5,), queue=queue, tenant=tenant, deadline=now + timedelta(seconds=600)
    )
    soon = make_job(
        sessions, sizes=(5,), queue=queue, tenant=tenant, deadline=now + timedelta(seconds=300)
    )
    low = make_job(sessions, sizes=(5,), queue=queue, tenant=tenant, priority="low")
    high = make_job(sessions, sizes=(5,), queue=queue, tenant=tenant, priority="high")
    order = [_claim_best(sessions, settings, queue) for _ in range(6)]
    # A deadline two days out is not at risk: it waits its turn by age, like `old`.
    assert [got[0] if got else None for got in order] == [high, soon, late, old, far, low]
    assert _claim_best(sessions, settings, queue) is None


def test_a_job_whose_deadline_is_lost_runs_after_those_that_can_still_meet_theirs(
    sessions: sessionmaker[Session], settings: Settings
) -> None:
    queue = _queue()
    now = datetime.now(UTC)
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    lost = make_job(sessions, sizes=(5,), queue=queue, tenant=tenant, deadline=now)
    sooner = make_job(
        sessions, sizes=(5,), queue=queue, tenant=tenant, deadline=now + timedelta(seconds=60)
    )
    later = make_job(
        sessions, sizes=(5,), queue=queue, tenant=tenant, deadline=now + timedelta(seconds=90)
    )
    with sessions.begin() as session:  # the router's verdict (control/router.py)
        session.execute(update(Job).where(Job.id == lost).values(deadline_lost=True))
    order = [_claim_best(sessions, settings, queue) for _ in range(3)]
    # Earliest deadline first, but the job that misses its deadline anyway goes last
    assert [got[0] if got else None for got in order] == [sooner, later, lost]


def test_suspects_are_left_to_their_own_doorbells(
    sessions: sessionmaker[Session], settings: Settings
) -> None:
    queue = _queue()
    job_id = make_job(sessions, sizes=(3, 3), queue=queue)
    crashed = claim(sessions, job_id, 0, lease=0)  # its worker "dies": the lease runs out
    assert crashed is not None
    with sessions.begin() as session:
        session.execute(
            update(Shard)
            .where(Shard.job_id == job_id, Shard.shard_no == 0)
            .values(state="expired", lease_until=None)
        )
    assert _claim_best(sessions, settings, queue) == (job_id, 1)
    assert _claim_best(sessions, settings, queue) is None  # shard 0 only by name, alone
    again = claim(sessions, job_id, 0)
    assert again is not None
    assert again.crashes == 1


def test_a_worker_claims_only_its_own_route_and_queue(
    sessions: sessionmaker[Session], settings: Settings
) -> None:
    queue = _queue()
    job_id = make_job(sessions, sizes=(3,), queue=queue)
    assert _claim_best(sessions, settings, queue, route="spill") is None
    assert _claim_best(sessions, settings, _queue()) is None
    assert _claim_best(sessions, settings, queue) == (job_id, 0)


def test_a_tenant_at_its_running_quota_is_passed_over(
    sessions: sessionmaker[Session], settings: Settings
) -> None:
    queue = _queue()
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    capped = make_job(sessions, sizes=(3, 3, 3), queue=queue, tenant=tenant)
    with sessions.begin() as session:
        session.execute(update(Tenant).where(Tenant.name == tenant).values(quota_running_shards=1))
    assert _claim_best(sessions, settings, queue) == (capped, 0)
    # Its shards wait: the doorbell is kept for a retry, not dropped.
    with pytest.raises(ClaimContended):
        _claim_best(sessions, settings, queue)
    with sessions() as session:
        attempt = session.get_one(Shard, (capped, 0)).attempt
    assert finish(sessions, capped, 0, attempt)
    assert _claim_best(sessions, settings, queue) == (capped, 1)


def test_a_shard_locked_by_another_transaction_keeps_the_doorbell(
    sessions: sessionmaker[Session], settings: Settings
) -> None:
    queue = _queue()
    job_id = make_job(sessions, sizes=(3,), queue=queue)
    # A publisher recording its doorbells holds the shard's row lock until it commits.
    with sessions.begin() as publisher:
        publisher.execute(
            update(Shard).where(Shard.job_id == job_id).values(enqueued_at=func.now())
        )
        with pytest.raises(ClaimContended):
            _claim_best(sessions, settings, queue)
    assert _claim_best(sessions, settings, queue) == (job_id, 0)
    assert _claim_best(sessions, settings, queue) is None


def test_rank_prefers_the_workers_job_on_a_fair_share_tie_and_weighs_tenants(
    settings: Settings,
) -> None:
    now = datetime.now(UTC)
    a, b = uuid.uuid4(), uuid.uuid4()

    def job(tenant: uuid.UUID, age: int) -> WaitingJob:
        return WaitingJob(uuid.uuid4(), tenant, "normal", None, now - timedelta(seconds=age), 4)

    older, newer = job(a, 60), job(b, 10)
    even = {a: TenantLoad(1.0, 1, 0, 0), b: TenantLoad(1.0, 1, 0, 0)}
    assert rank_jobs([older, newer], even, now=now, settings=settings) == [older, newer]
    preferred = rank_jobs([older, newer], even, now=now, settings=settings, prefer={newer.id})
    assert preferred == [newer, older]
    # Tenant a ran 4 shards' worth recently; with weight 4 that is one shard per unit of weight,
    # which ties with b's one shard at weight 1; at weight 1 it is four times b's share.
    shard = settings.shard_size
    heavy = {a: TenantLoad(4.0, 0, 4 * shard, 0), b: TenantLoad(1.0, 0, shard, 0)}
    assert rank_jobs([older, newer], heavy, now=now, settings=settings) == [older, newer]
    light = {a: TenantLoad(1.0, 0, 4 * shard, 0), b: TenantLoad(1.0, 0, shard, 0)}
    assert rank_jobs([older, newer], light, now=now, settings=settings) == [newer, older]
