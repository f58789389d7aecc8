"""Job rows against real Postgres: creation with skipped lines, tenant isolation, cancel, counts
and spend per route."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from postroom.db.models import Job, Result
from postroom.domain import ShardState
from postroom.errors import NotFound
from postroom.intake import Rejected
from postroom.jobs import ALL_INVALID, cancel_job, find_job, job_counts, spend_by_route
from postroom.shards import claim_shard, finish_shard
from tests.postroom.jobrows import claim, job_status, make_job, shard_row

pytestmark = pytest.mark.usefixtures("stop_jobs_made_here")


def test_a_job_counts_its_skipped_lines_as_failed(sessions: sessionmaker[Session]) -> None:
    bad = Rejected(line=4, id=None, field="text", reason="empty", result_id="line:4")
    job_id = make_job(sessions, sizes=(3, 2), rejected=(bad,))
    with sessions() as session:
        job = session.get_one(Job, job_id)
        assert (job.total_docs, job.rejected_docs, job.shard_count) == (6, 1, 2)
        counts = job_counts(session=session, job=job)
        errors = session.scalars(select(Result.error).where(Result.job_id == job_id)).all()
    assert (counts.total, counts.failed, counts.pending, counts.succeeded) == (6, 1, 5, 0)
    assert errors == ["invalid_document: line 4, field text: empty"]


def test_a_job_with_only_skipped_lines_fails_at_once(
    sessions: sessionmaker[Session],
) -> None:
    bad = Rejected(line=1, id="x", field="text", reason="empty", result_id="x")
    job_id = make_job(sessions, sizes=(), rejected=(bad,))
    assert job_status(sessions, job_id) == "failed"
    with sessions() as session:
        assert session.get_one(Job, job_id).error == ALL_INVALID


def test_a_job_with_no_lines_completes_at_once(sessions: sessionmaker[Session]) -> None:
    assert job_status(sessions, make_job(sessions, sizes=())) == "completed"


def test_other_tenants_jobs_are_not_found(sessions: sessionmaker[Session]) -> None:
    job_id = make_job(sessions, tenant="owner")
    other = make_job(sessions, tenant="other")
    with sessions() as session:
        owner_id = session.get_one(Job, job_id).tenant_id
        assert find_job(session=session, tenant_id=owner_id, job_id=job_id).id == job_id
        assert find_job(session=session, tenant_id=None, job_id=other).id == other
        with pytest.raises(NotFound, match="jobs of other tenants are not visible"):
            find_job(session=session, tenant_id=owner_id, job_id=other)


def test_cancel_stops_what_has_not_started(sessions: sessionmaker[Session]) -> None:
    job_id = make_job(sessions, sizes=(3, 3, 3))
    assert claim(sessions, job_id, 0) is not None
    with sessions.begin() as session:
        tenant_id = session.get_one(Job, job_id).tenant_id
        job = cancel_job(session=session, tenant_id=tenant_id, job_id=job_id)
        assert job.status == "cancelled"
        again = cancel_job(session=session, tenant_id=tenant_id, job_id=job_id)
        assert again.finished_at == job.finished_at  # a repeat changes nothing
    assert shard_row(sessions, job_id, 0).state == ShardState.running  # it finishes
    assert shard_row(sessions, job_id, 1).state == ShardState.cancelled
    with sessions() as session:
        counts = job_counts(session=session, job=session.get_one(Job, job_id))
    assert (counts.cancelled, counts.pending) == (6, 3)


def test_spend_is_summed_per_route(sessions: sessionmaker[Session]) -> None:
    job_id = make_job(sessions, sizes=(3, 2))
    with sessions.begin() as session:
        for shard_no, route in ((0, "gpu"), (1, "spill")):
            claimed = claim_shard(
                session=session, job_id=job_id, shard_no=shard_no, worker="w", lease_seconds=60
            )
            assert claimed is not None
            assert finish_shard(
                session=session,
                job_id=job_id,
                shard_no=shard_no,
                attempt=claimed.attempt,
                succeeded=2,
                failed=shard_no,
                route=route,
                tokens_in=100 * (shard_no + 1),
                tokens_out=5,
            )
    with sessions() as session:
        spend = spend_by_route(session=session, job_id=job_id)
        counts = job_counts(session=session, job=session.get_one(Job, job_id))
        results = session.scalar(select(func.count()).select_from(Result))
    assert spend == {
        "gpu": {"docs": 2, "tokens_in": 100, "tokens_out": 5},
        "spill": {"docs": 3, "tokens_in": 200, "tokens_out": 5},
    }
    assert (counts.succeeded, counts.failed) == (4, 1)
    assert results is not None
    assert job_status(sessions, job_id) == "completed"
