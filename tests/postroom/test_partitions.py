"""The results table's partitions against real Postgres: a day with no partition (the beat down
for over a month) still takes its results, the writer making the day's partition (split by
`part`) on demand, and a big job's own partition under it; the beat's tick then finds the day
made; a job being deleted gets no partition made for it."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime, timedelta

import pytest
from sqlalchemy import text, update
from sqlalchemy.orm import Session, sessionmaker

from postroom.db.models import Job
from postroom.deletion import mark_deleted
from postroom.domain import DocResult
from postroom.jobs import work_order
from postroom.partitions import (
    SHARED,
    detach_and_drop,
    ensure_partitions,
    existing_partitions,
    job_partition_name,
    partition_name,
)
from postroom.results import count_results, iter_result_lines, upsert_results
from postroom.shards import claim_shard
from tests.postroom.jobrows import make_job

AHEAD = 45  # days: past the 30 the beat makes ahead, so no partition exists for it


def children(sessions: sessionmaker[Session], parent: str) -> dict[str, str]:
    """Partitions of `parent`: name -> bounds."""
    with sessions() as session:
        rows = session.execute(
            text(
                "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i "
                "JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_class p ON p.oid = i.inhparent "
                "WHERE p.relname = :parent"
            ),
            {"parent": parent},
        ).all()
    return {str(name): str(bounds) for name, bounds in rows}


@pytest.fixture
def far_day(sessions: sessionmaker[Session]) -> object:
    """A day with no results partition (dropped again afterwards)."""
    day = datetime.now(UTC).date() + timedelta(days=AHEAD)
    with sessions() as session:
        assert day not in existing_partitions(session.connection())
    yield day
    engine = sessions.kw["bind"]
    assert detach_and_drop(engine, "results", partition_name(day))


def write_shard(
    sessions: sessionmaker[Session], job_id: uuid.UUID, docs: int, *, then_deleted: bool = False
) -> None:
    """Shard 0's results, as a worker writes them (`then_deleted`: the job is deleted between
    the claim and the write)."""
    with sessions.begin() as session:
        claimed = claim_shard(
            session=session, job_id=job_id, shard_no=0, worker="w", lease_seconds=60, route="gpu"
        )
        assert claimed is not None
    if then_deleted:
        with sessions.begin() as session:
            mark_deleted(session=session, tenant_id=None, job_id=job_id)
    with sessions.begin() as session:
        order = work_order(session=session, job_id=job_id)
        upsert_results(
            session=session,
            job_id=job_id,
            shard_no=0,
            attempt=claimed.attempt,
            route="gpu",
            model="tiny",
            revision="r",
            results=[(n, DocResult(id=f"d{n}", label="a")) for n in range(docs)],
            job_created_at=order.created_at,
            part=order.part,
        )


def created_on(sessions: sessionmaker[Session], job_id: uuid.UUID, day: date) -> None:
    with sessions.begin() as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(created_at=datetime(day.year, day.month, day.day, 12, tzinfo=UTC))
        )


def test_results_of_a_day_without_a_partition_are_written(
    sessions: sessionmaker[Session], far_day: date
) -> None:
    # Given jobs created on a day that has no partition, one small and one big
    small = make_job(sessions, sizes=(3,))
    big = make_job(sessions, sizes=(4,), own_partition=True)
    for job_id in (small, big):
        created_on(sessions, job_id, far_day)
    # When a worker writes their results
    write_shard(sessions, small, 3)
    write_shard(sessions, big, 4)
    # Then they are written, in the day's partition made on demand: split by part, the small
    # job's rows in its shared partition, the big job's in one of its own
    with sessions() as session:
        assert count_results(session=session, job_id=small) == 3
        assert [r["id"] for r in iter_result_lines(session=session, job_id=big)] == [
            "d0",
            "d1",
            "d2",
            "d3",
        ]
        assert far_day in existing_partitions(session.connection())
        name = partition_name(far_day)
        shared = session.execute(text(f"SELECT count(*) FROM {name}_shared")).scalar_one()
        own = session.execute(
            text(f"SELECT count(*) FROM {job_partition_name(far_day, big)}")
        ).scalar_one()
    assert (shared, own) == (3, 4)
    assert children(sessions, name) == {
        f"{name}_shared": f"FOR VALUES IN ('{SHARED}')",
        job_partition_name(far_day, big): f"FOR VALUES IN ('{big}')",
    }
    # and the beat's tick, making days ahead, finds nothing to redo (none of its days is this)
    assert ensure_partitions(sessions.kw["bind"]) == 0


def test_a_job_being_deleted_gets_no_partition_made(
    sessions: sessionmaker[Session], far_day: date
) -> None:
    big = make_job(sessions, sizes=(2,), own_partition=True)
    created_on(sessions, big, far_day)
    with pytest.raises(LookupError, match="being deleted"):
        write_shard(sessions, big, 2, then_deleted=True)
    with sessions() as session:
        assert far_day not in existing_partitions(session.connection())
    with sessions() as session:  # (the fixture drops the day: make it, empty)
        session.execute(text(f"CREATE TABLE {partition_name(far_day)} (LIKE results)"))
        session.commit()
