"""A job whose shards run while its upload still streams (postroom.submit's early start), in
Postgres: it stays `validating` while shards are claimed and finished, completes only once sealed,
keeps a cancel, and the reaper withdraws one whose upload never ended."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from postroom.db.models import Job
from postroom.deletion import withdraw_abandoned_uploads
from postroom.jobs import NewJob, add_received_shards, cancel_job, root_shards, seal_received_job
from postroom.shard_numbers import EARLY_SHARD_BASE, child_shard_nos, early_start_fits
from tests.postroom.jobrows import SPEC, claim, finish, job_status, make_job

pytestmark = pytest.mark.usefixtures("stop_jobs_made_here")


def _receive(
    sessions: sessionmaker[Session], job_id: uuid.UUID, first: int, sizes: list[int]
) -> bool:
    with sessions.begin() as session:
        return add_received_shards(
            session=session, job_id=job_id, first=first, sizes=sizes, queue="gpu.rows"
        )


def _seal(sessions: sessionmaker[Session], job_id: uuid.UUID, sizes: list[int]) -> Job:
    with sessions.begin() as session:
        job = session.get_one(Job, job_id)
        new = NewJob(
            job_id=job_id,
            tenant_id=job.tenant_id,
            spec=SPEC,
            spill="auto",
            deadline=None,
            metadata=None,
            idempotency_key=None,
            body_hash=None,
            shard_sizes=sizes,
            rejected=(),
            queue="gpu.rows",
        )
        seal_received_job(session=session, job=job, new=new, first=2)
        session.expunge(job)
        return job


def test_shards_run_early_but_the_job_completes_only_when_sealed(
    sessions: sessionmaker[Session],
) -> None:
    job_id = make_job(sessions, sizes=(), receiving=True)
    assert job_status(sessions, job_id) == "validating"
    assert _receive(sessions, job_id, 0, [3, 3])
    for shard_no in (0, 1):
        claimed = claim(sessions, job_id, shard_no)
        assert claimed is not None
        assert finish(sessions, job_id, shard_no, claimed.attempt)
    # Every shard so far is done, but more may come: still validating, started.
    assert job_status(sessions, job_id) == "validating"
    with sessions() as session:
        job = session.get_one(Job, job_id)
        assert job.started_at is not None
        assert (job.total_docs, job.shard_count) == (6, EARLY_SHARD_BASE)
        assert root_shards(session=session, job=job) == 2
    job = _seal(sessions, job_id, [3, 3, 3])
    assert (job.status, job.total_docs) == ("running", 9)
    claimed = claim(sessions, job_id, 2)
    assert claimed is not None
    assert finish(sessions, job_id, 2, claimed.attempt)
    assert job_status(sessions, job_id) == "completed"


def test_sealing_a_job_whose_shards_are_all_done_completes_it(
    sessions: sessionmaker[Session],
) -> None:
    job_id = make_job(sessions, sizes=(), receiving=True)
    assert _receive(sessions, job_id, 0, [3, 3])
    for shard_no in (0, 1):
        claimed = claim(sessions, job_id, shard_no)
        assert claimed is not None
        finish(sessions, job_id, shard_no, claimed.attempt)
    assert _seal(sessions, job_id, [3, 3]).status == "completed"


def test_a_cancel_while_receiving_stops_further_shards(sessions: sessionmaker[Session]) -> None:
    job_id = make_job(sessions, sizes=(), receiving=True)
    assert _receive(sessions, job_id, 0, [3])
    with sessions.begin() as session:
        tenant_id = session.get_one(Job, job_id).tenant_id
        cancel_job(session=session, tenant_id=tenant_id, job_id=job_id)
    assert not _receive(sessions, job_id, 1, [3])
    assert _seal(sessions, job_id, [3, 3, 3]).status == "cancelled"
    with sessions() as session:
        assert root_shards(session=session, job=session.get_one(Job, job_id)) == 1


def test_the_reaper_withdraws_an_upload_that_never_ended(sessions: sessionmaker[Session]) -> None:
    old = make_job(sessions, sizes=(), receiving=True)
    fresh = make_job(sessions, sizes=(), receiving=True)
    assert _receive(sessions, old, 0, [3])
    with sessions.begin() as session:
        session.execute(
            update(Job).where(Job.id == old).values(created_at=func.now() - timedelta(hours=2))
        )
        assert withdraw_abandoned_uploads(session=session, older_than_seconds=3600) == 1
    with sessions() as session:
        rows = {
            r.id: r
            for r in session.execute(
                select(Job.id, Job.status, Job.deleted_at).where(Job.id.in_([old, fresh]))
            )
        }
    assert rows[old].status == "cancelled"
    assert rows[old].deleted_at is not None
    assert (rows[fresh].status, rows[fresh].deleted_at) == ("validating", None)


def test_split_parts_of_an_early_job_fit_the_shard_number_column() -> None:
    assert early_start_fits(shard_size=256, fanout=16)
    assert not early_start_fits(shard_size=1_000_000, fanout=2)
    # The deepest part of the last possible root shard, at the default sizes.
    deepest = EARLY_SHARD_BASE - 1
    for _ in range(2):  # 256 -> 16 -> 1
        deepest = child_shard_nos(deepest, shard_count=EARLY_SHARD_BASE, fanout=16, parts=16)[-1]
    assert deepest < 2**31 - 1
