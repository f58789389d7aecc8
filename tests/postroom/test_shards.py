"""The shard state machine against real Postgres: claim, double claim, route fencing, lease loss,
fenced finish, release, split, expiry and republish. Each call is one transaction, as in the
worker and the beat."""

from __future__ import annotations

import pytest
from sqlalchemy.orm import Session, sessionmaker

from postroom.backlog import shards_to_republish, unpublished_shards
from postroom.domain import QUEUE_SPILL, ShardState
from postroom.shard_numbers import child_shard_nos
from postroom.shards import (
    Claimed,
    expire_leases,
    extend_leases,
    mark_published,
    move_unclaimed,
    release_shard,
    split_shard,
)
from tests.postroom.jobrows import claim, finish, job_status, make_job, shard_row

pytestmark = pytest.mark.usefixtures("stop_jobs_made_here")


def test_a_shard_is_claimed_once_and_its_job_starts(sessions: sessionmaker[Session]) -> None:
    job_id = make_job(sessions)
    assert job_status(sessions, job_id) == "queued"
    first = claim(sessions, job_id, 0)
    assert first == Claimed(attempt=1, crashes=0, queue="gpu.rows")
    assert job_status(sessions, job_id) == "running"
    # A duplicate delivery of the same doorbell is a no-op.
    assert claim(sessions, job_id, 0) is None
    row = shard_row(sessions, job_id, 0)
    assert (row.state, row.attempt, row.worker) == (ShardState.running, 1, "w1")


def test_a_worker_claims_only_shards_of_its_route(sessions: sessionmaker[Session]) -> None:
    job_id = make_job(sessions, sizes=(2,))
    assert claim(sessions, job_id, 0, route="spill") is None
    with sessions.begin() as session:
        moved = move_unclaimed(session=session, job_id=job_id, shard_nos=[0], to_queue=QUEUE_SPILL)
    assert moved == [0]
    assert claim(sessions, job_id, 0, route="gpu") is None
    claimed = claim(sessions, job_id, 0, route="spill")
    assert claimed is not None
    assert claimed.queue == QUEUE_SPILL
    # A claimed shard no longer moves.
    with sessions.begin() as session:
        assert (
            move_unclaimed(session=session, job_id=job_id, shard_nos=[0], to_queue="gpu.rows") == []
        )


def test_a_lost_lease_fences_the_late_worker_out(sessions: sessionmaker[Session]) -> None:
    job_id = make_job(sessions, sizes=(3,))
    late = claim(sessions, job_id, 0, lease=0)  # its lease has run out by the next statement
    assert late is not None
    taken = claim(sessions, job_id, 0)
    assert taken is not None
    # The first attempt died without giving the shard back: it counts as a crash.
    assert (taken.attempt, taken.crashes) == (2, 1)
    with sessions.begin() as session:
        assert extend_leases(session=session, leases=[(job_id, 0, 1)], lease_seconds=60) == 0
        assert extend_leases(session=session, leases=[(job_id, 0, 2)], lease_seconds=60) == 1
    assert finish(sessions, job_id, 0, late.attempt) is False
    assert job_status(sessions, job_id) == "running"
    assert finish(sessions, job_id, 0, taken.attempt) is True
    assert job_status(sessions, job_id) == "completed"
    assert finish(sessions, job_id, 0, taken.attempt) is False  # done is final


def test_the_job_completes_with_its_last_shard(sessions: sessionmaker[Session]) -> None:
    job_id = make_job(sessions, sizes=(3, 3, 3))
    attempts = [claim(sessions, job_id, n) for n in range(3)]
    for shard_no, claimed in enumerate(attempts[:2]):
        assert claimed is not None
        assert finish(sessions, job_id, shard_no, claimed.attempt)
        assert job_status(sessions, job_id) == "running"
    assert attempts[2] is not None
    assert finish(sessions, job_id, 2, attempts[2].attempt)
    assert job_status(sessions, job_id) == "completed"


def test_a_released_shard_is_claimed_again_without_a_crash(sessions: sessionmaker[Session]) -> None:
    job_id = make_job(sessions, sizes=(3,))
    first = claim(sessions, job_id, 0)
    assert first is not None
    with sessions.begin() as session:
        assert release_shard(session=session, job_id=job_id, shard_no=0, attempt=first.attempt)
        # Only the holder can release.
        assert not release_shard(session=session, job_id=job_id, shard_no=0, attempt=first.attempt)
    again = claim(sessions, job_id, 0)
    assert again == Claimed(attempt=2, crashes=0, queue="gpu.rows")


def test_expired_leases_are_republished(sessions: sessionmaker[Session]) -> None:
    job_id = make_job(sessions, sizes=(3, 3))
    with sessions.begin() as session:
        mark_published(session=session, shards=[(job_id, 0), (job_id, 1)])
        assert unpublished_shards(session=session, job_id=job_id) == []
    assert claim(sessions, job_id, 0, lease=0) is not None
    with sessions.begin() as session:
        assert expire_leases(session=session) >= 1
    row = shard_row(sessions, job_id, 0)
    assert (row.state, row.worker, row.enqueued_at) == (ShardState.expired, None, None)
    with sessions() as session:
        due = shards_to_republish(
            session=session, idle_queues=[], grace_seconds=0, stale_seconds=3600
        )
    assert (job_id, 0, "gpu.rows") in due
    assert (job_id, 1, "gpu.rows") not in due  # published, its queue not known to be empty
    with sessions() as session:
        idle = shards_to_republish(
            session=session, idle_queues=["gpu.rows"], grace_seconds=0, stale_seconds=3600
        )
    assert {(job_id, 0, "gpu.rows"), (job_id, 1, "gpu.rows")} <= set(idle)


def test_a_split_is_fenced_deterministic_and_finishes_the_job(
    sessions: sessionmaker[Session],
) -> None:
    job_id = make_job(sessions, sizes=(4, 3))
    claimed = claim(sessions, job_id, 0)
    assert claimed is not None
    children = child_shard_nos(0, shard_count=2, fanout=4, parts=2)
    assert children == [2, 3]
    assert child_shard_nos(1, shard_count=2, fanout=4, parts=2) == [6, 7]  # never collide

    def split(attempt: int) -> list[int]:
        with sessions.begin() as session:
            return split_shard(
                session=session,
                job_id=job_id,
                shard_no=0,
                attempt=attempt,
                children=children,
                child_sizes=[2, 2],
                queue="gpu.rows",
            )

    assert split(claimed.attempt + 1) == []  # not the holder
    assert split(claimed.attempt) == [2, 3]
    assert split(claimed.attempt) == []  # replaced already: a repeat is a no-op
    assert shard_row(sessions, job_id, 0).state == ShardState.replaced
    for shard_no in (1, 2, 3):
        part = claim(sessions, job_id, shard_no)
        assert part is not None
        assert finish(sessions, job_id, shard_no, part.attempt)
    assert job_status(sessions, job_id) == "completed"
