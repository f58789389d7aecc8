"""DELETE /v1/jobs/{id}: afterwards no row and no S3 object of the job remain (by listing), the
job answers 404, a second job of the same tenant is untouched; a deletion cut short resumes; a
job with a running shard is finished by the beat's purge once the shard stops."""

from __future__ import annotations

import uuid
from datetime import UTC

import httpx
import pytest
from sqlalchemy import func, select, text, update
from sqlalchemy.orm import Session, sessionmaker

from control.purge import purge_tick
from postroom.db.inbox_models import InboxObject
from postroom.db.models import Job, Result, Shard
from postroom.deletion import mark_deleted
from postroom.exports import export_job_parquet
from postroom.keys import (
    done_key,
    job_prefixes,
    outbox_errors_key,
    outbox_results_key,
    results_parquet_key,
)
from postroom.partitions import job_partition_name
from postroom.settings import Settings
from postroom.shards import claim_shard, finish_shard, mark_results_written
from postroom.storage import Storage
from postroom_cli.client import ApiError, Client
from tests.finished_jobs import finished_job
from tests.postroom.jobrows import make_job
from tests.stack import new_key


def rows_of(sessions: sessionmaker[Session], job_id: uuid.UUID) -> dict[str, int]:
    with sessions() as session:
        return {
            table.__tablename__: int(
                session.execute(
                    select(func.count()).select_from(table).where(column == job_id)
                ).scalar_one()
            )
            for table, column in ((Job, Job.id), (Shard, Shard.job_id), (Result, Result.job_id))
        }


def objects_of(storage: Storage, job_id: uuid.UUID) -> list[str]:
    keys: list[str] = []
    for prefix in job_prefixes(job_id):
        page, _ = storage.list_page(prefix)
        keys += [item.key for item in page]
    return keys


def test_delete_leaves_no_row_and_no_object_and_spares_the_other_job(
    api_url: str, sessions: sessionmaker[Session], storage: Storage, settings: Settings
) -> None:
    tenant = f"del-{uuid.uuid4().hex[:8]}"
    client = Client(api_url, new_key(sessions, tenant=tenant))
    doomed = finished_job(sessions, tenant=tenant, docs=2_500, shard_size=500, storage=storage)
    other = finished_job(sessions, tenant=tenant, docs=1_000, shard_size=500, storage=storage)
    export_job_parquet(sessions, storage, job_id=doomed, settings=settings)
    assert results_parquet_key(doomed) in objects_of(storage, doomed)
    other_rows, other_objects = rows_of(sessions, other), objects_of(storage, other)
    assert rows_of(sessions, doomed) == {"jobs": 1, "shards": 5, "results": 2_500}

    # When
    response = client.http.delete(f"/v1/jobs/{doomed}")

    # Then
    assert response.status_code == 204, response.text
    assert rows_of(sessions, doomed) == {"jobs": 0, "shards": 0, "results": 0}
    assert objects_of(storage, doomed) == []
    for call in (client.job, client.delete):
        with pytest.raises(ApiError) as gone:
            call(str(doomed))
        assert gone.value.status == 404
    assert rows_of(sessions, other) == other_rows
    assert objects_of(storage, other) == other_objects
    assert [job["id"] for job in client.jobs()["data"]] == [str(other)]


def partition_of(sessions: sessionmaker[Session], job_id: uuid.UUID) -> str:
    """The name the job's own partition has, if it has one."""
    with sessions() as session:
        day = session.get_one(Job, job_id).created_at.astimezone(UTC).date()
    return job_partition_name(day, job_id)


def partition_rows(sessions: sessionmaker[Session], name: str) -> int | None:
    """Rows in that partition (None: there is none)."""
    with sessions() as session:
        if session.execute(text("SELECT to_regclass(:n)"), {"n": name}).scalar_one() is None:
            return None
        return int(session.execute(text(f"SELECT count(*) FROM {name}")).scalar_one())


def test_deleting_a_big_job_drops_its_partition_and_spares_the_others(
    api_url: str, sessions: sessionmaker[Session], storage: Storage
) -> None:
    # Given two jobs with partitions of their own (as jobs over
    # POSTROOM_RESULTS_OWN_PARTITION_DOCS have) and one sharing its day's partition
    tenant = f"del-{uuid.uuid4().hex[:8]}"
    client = Client(api_url, new_key(sessions, tenant=tenant))
    doomed, big, small = (
        finished_job(
            sessions, tenant=tenant, docs=docs, shard_size=500, storage=storage, own_partition=own
        )
        for docs, own in ((1_500, True), (1_000, True), (700, False))
    )
    names = {job: partition_of(sessions, job) for job in (doomed, big, small)}
    assert [partition_rows(sessions, names[job]) for job in (doomed, big)] == [1_500, 1_000]
    assert partition_rows(sessions, names[small]) is None
    before = {job: (rows_of(sessions, job), objects_of(storage, job)) for job in (big, small)}
    # When the first is deleted
    assert client.http.delete(f"/v1/jobs/{doomed}").status_code == 204
    # Then its partition is gone with every row, and the others are as they were
    assert partition_rows(sessions, names[doomed]) is None
    assert rows_of(sessions, doomed) == {"jobs": 0, "shards": 0, "results": 0}
    assert objects_of(storage, doomed) == []
    assert partition_rows(sessions, names[big]) == 1_000
    after = {job: (rows_of(sessions, job), objects_of(storage, job)) for job in (big, small)}
    assert after == before
    assert len(list(client.results(str(big)))) == 1_000
    assert len(list(client.results(str(small)))) == 700


def test_a_deletion_cut_short_resumes_on_the_next_delete(
    api_url: str, sessions: sessionmaker[Session], storage: Storage
) -> None:
    tenant = f"del-{uuid.uuid4().hex[:8]}"
    key = new_key(sessions, tenant=tenant)
    job_id = finished_job(sessions, tenant=tenant, docs=600, shard_size=300, storage=storage)
    # Given a deletion that died midway: marked, some objects and rows already gone
    with sessions.begin() as session:
        mark_deleted(session=session, tenant_id=None, job_id=job_id)
        session.execute(
            text("DELETE FROM results WHERE job_id = :j AND line <= 100"), {"j": job_id}
        )
    storage.delete_prefix(f"inputs/{job_id}/")
    client = Client(api_url, key)
    assert client.http.get(f"/v1/jobs/{job_id}").status_code == 404  # hidden from the start
    # When the DELETE comes again, it finishes the job off
    assert client.http.delete(f"/v1/jobs/{job_id}").status_code == 204
    assert rows_of(sessions, job_id) == {"jobs": 0, "shards": 0, "results": 0}
    assert objects_of(storage, job_id) == []


def test_a_running_shard_holds_the_purge_until_it_stops(
    api_url: str, sessions: sessionmaker[Session], storage: Storage, settings: Settings
) -> None:
    tenant = f"del-{uuid.uuid4().hex[:8]}"
    key = new_key(sessions, tenant=tenant)
    job_id = make_job(sessions, sizes=(3, 3), tenant=tenant)
    with sessions.begin() as session:
        claimed = claim_shard(
            session=session,
            job_id=job_id,
            shard_no=0,
            worker="w",
            lease_seconds=300,
            route="gpu",
        )
    assert claimed is not None
    response = httpx.delete(
        f"{api_url}/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {key}"}
    )
    assert response.status_code == 202, response.text
    assert "still running" in response.json()["message"]
    with sessions() as session:
        states = dict(
            session.execute(select(Shard.shard_no, Shard.state).where(Shard.job_id == job_id)).all()
        )
    assert states == {0: "running", 1: "cancelled"}
    # The worker finishes its shard and writes its object, as a worker does after the commit
    with sessions.begin() as session:
        assert finish_shard(
            session=session,
            job_id=job_id,
            shard_no=0,
            attempt=claimed.attempt,
            succeeded=3,
            failed=0,
            route="gpu",
        )
    storage.put_bytes(f"results/{job_id}/shard-000000.jsonl", b"{}\n")
    with sessions.begin() as session:
        mark_results_written(session=session, job_id=job_id, shard_no=0)
    # The beat's purge then removes everything (other jobs marked deleted may go too).
    purge = settings.model_copy(update={"purge_jobs_per_tick": 1000})
    purge_tick(sessions=sessions, storage=storage, settings=purge)
    assert rows_of(sessions, job_id) == {"jobs": 0, "shards": 0, "results": 0}
    assert objects_of(storage, job_id) == []


def test_an_unknown_or_foreign_job_answers_404(
    api_url: str, sessions: sessionmaker[Session]
) -> None:
    owner = f"del-{uuid.uuid4().hex[:8]}"
    job_id = make_job(sessions, sizes=(2,), tenant=owner)
    stranger = Client(api_url, new_key(sessions))
    for target in (job_id, uuid.uuid4()):
        response = stranger.http.delete(f"/v1/jobs/{target}")
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "not_found"
    with sessions.begin() as session:  # the owner's job is untouched
        assert session.get_one(Job, job_id).deleted_at is None
        session.execute(update(Job).where(Job.id == job_id).values(status="cancelled"))


def test_a_drop_folder_job_takes_its_outbox_files_and_input_with_it(
    api_url: str, sessions: sessionmaker[Session], storage: Storage
) -> None:
    tenant = f"del-{uuid.uuid4().hex[:8]}"
    client = Client(api_url, new_key(sessions, tenant=tenant))
    job_id = finished_job(sessions, tenant=tenant, docs=10, shard_size=10, storage=storage)
    folder, file = f"tix-{job_id.hex[:6]}", "march.jsonl"
    with sessions.begin() as session:
        session.add(
            InboxObject(
                id=uuid.uuid4(),
                bucket=storage.bucket,
                key=f"inbox/{folder}/{file}",
                etag="e1",
                size=10,
                folder=folder,
                file=file,
                state="done",
                job_id=job_id,
            )
        )
    written = [
        outbox_results_key("", folder, file),
        outbox_errors_key("", folder, file),
        done_key("", folder, file),
    ]
    for key in written:
        storage.put_bytes(key, b"{}\n")
    assert client.http.delete(f"/v1/jobs/{job_id}").status_code == 204
    for key in written:
        assert storage.list_page(key)[0] == [], key
    with sessions() as session:
        left = session.execute(select(InboxObject).where(InboxObject.folder == folder)).first()
    assert left is None
