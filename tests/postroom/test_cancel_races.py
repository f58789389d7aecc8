"""A cancel (or a delete) racing a worker's claim of the same job, against real Postgres.

The claim locks its shard row, then the job row; a cancel that took the job row first and then
the shard rows deadlocked with it, and Postgres ended one of the two: the API answered 500 (seen
in CI through the OpenAI batch cancel). Here the claim's first lock is held open, the cancel is
let run until it waits on that lock, and then the claim takes the job row: both must go through.

An upload's seal holds the job row while it inserts the rest of the shards; a cancel that came
meanwhile cancelled the shards it could see and left the sealed ones queued on a cancelled job
(a worker then wrote their documents as failed, not cancelled).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager

import pytest
from sqlalchemy import select, text
from sqlalchemy.orm import Session, sessionmaker

from postroom.db.models import Job, Shard
from postroom.deletion import mark_deleted
from postroom.domain import ShardState
from postroom.jobs import add_received_shards, cancel_job
from postroom.shards import claim_shard
from tests.postroom.jobrows import job_status, make_job, shard_row
from tests.waiting import wait_until

pytestmark = pytest.mark.usefixtures("stop_jobs_made_here")


def by_cancel(session: Session, job_id: uuid.UUID) -> None:
    tenant_id = session.get_one(Job, job_id).tenant_id
    cancel_job(session=session, tenant_id=tenant_id, job_id=job_id)


def by_delete(session: Session, job_id: uuid.UUID) -> None:
    mark_deleted(session=session, tenant_id=None, job_id=job_id)


def waits_on_a_lock(sessions: sessionmaker[Session], pid: int) -> bool:
    with sessions() as session:
        waiting = session.execute(
            text("SELECT wait_event_type FROM pg_stat_activity WHERE pid = :pid"), {"pid": pid}
        ).scalar_one_or_none()
    return waiting == "Lock"


@contextmanager
def stopping_until_it_waits(
    sessions: sessionmaker[Session], stop: Callable[[Session, uuid.UUID], None], job_id: uuid.UUID
) -> Iterator[Future[None]]:
    """Run the cancel (or delete) in a thread of its own until it waits on a row lock; yields
    its future, to be resolved once the lock is let go."""
    pids: list[int] = []

    def stopping() -> None:
        with sessions.begin() as session:
            session.execute(text("SET LOCAL statement_timeout = '20s'"))
            pids.append(session.execute(text("SELECT pg_backend_pid()")).scalar_one())
            stop(session, job_id)

    with ThreadPoolExecutor(1) as pool:
        stopped = pool.submit(stopping)
        wait_until(lambda: pids and waits_on_a_lock(sessions, pids[0]), timeout=30, what="a wait")
        yield stopped


@pytest.mark.parametrize("stop", [by_cancel, by_delete], ids=["cancel", "delete"])
def test_a_cancel_and_a_claim_of_the_same_job_both_go_through(
    sessions: sessionmaker[Session], stop: Callable[[Session, uuid.UUID], None]
) -> None:
    # Given a queued job of three shards, and a worker's claim that holds shard 0's row lock
    job_id = make_job(sessions, sizes=(3, 3, 3))
    claimer = sessions()
    claimer.begin()
    claimer.execute(text("SET LOCAL statement_timeout = '20s'"))
    claimer.execute(
        select(Shard.shard_no)
        .where(Shard.job_id == job_id, Shard.shard_no == 0)
        .with_for_update(key_share=True)
    )

    # When the cancel runs until it waits on that shard row
    with stopping_until_it_waits(sessions, stop, job_id) as stopped:
        # and the claim then goes on to the job row, as claim_shard does
        try:
            claimed = claim_shard(
                session=claimer, job_id=job_id, shard_no=0, worker="w1", lease_seconds=60
            )
            claimer.commit()
        finally:
            claimer.close()
        # Then neither is ended as a deadlock: the claim holds shard 0, the cancel has the rest
        stopped.result(timeout=30)
    assert claimed is not None
    assert job_status(sessions, job_id) == "cancelled"
    assert shard_row(sessions, job_id, 0).state == ShardState.running  # it finishes
    assert {shard_row(sessions, job_id, n).state for n in (1, 2)} == {ShardState.cancelled}


@pytest.mark.parametrize("stop", [by_cancel, by_delete], ids=["cancel", "delete"])
def test_a_cancel_during_an_upload_seal_cancels_the_sealed_shards_too(
    sessions: sessionmaker[Session], stop: Callable[[Session, uuid.UUID], None]
) -> None:
    # Given an upload that started early (shards 0 and 1 are in) and whose seal holds the job
    # row while it inserts shards 2 and 3
    job_id = make_job(sessions, sizes=(), receiving=True)
    with sessions.begin() as session:
        assert add_received_shards(
            session=session, job_id=job_id, first=0, sizes=[3, 3], queue="gpu.rows"
        )
    sealer = sessions()
    sealer.begin()
    sealer.execute(text("SET LOCAL statement_timeout = '20s'"))
    assert add_received_shards(
        session=sealer, job_id=job_id, first=2, sizes=[3, 3], queue="gpu.rows"
    )

    # When a cancel runs until it waits on the job row, and the seal then commits
    with stopping_until_it_waits(sessions, stop, job_id) as stopped:
        try:
            sealer.commit()
        finally:
            sealer.close()
        stopped.result(timeout=30)
    # Then the job and all four shards are cancelled: none is left queued for a worker
    assert job_status(sessions, job_id) == "cancelled"
    states = {n: shard_row(sessions, job_id, n).state for n in range(4)}
    assert states == dict.fromkeys(range(4), ShardState.cancelled)
