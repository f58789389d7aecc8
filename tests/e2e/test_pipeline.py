"""A job through every real part: CLI → API → S3 → Redis → worker (vLLM) → S3 + Postgres."""

from __future__ import annotations

import json
import subprocess
import uuid
from typing import Any

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from postroom.db.models import Job, Result, Shard
from postroom.jobs import job_counts
from postroom.keys import input_shard_key, result_shard_key
from postroom.queue import gpu_queue, make_celery, publish_shard
from postroom.settings import Settings
from postroom.storage import Storage, encode_jsonl
from postroom_cli.client import Client
from postroom_cli.local import postroom_command
from tests.helpers import LABELS, make_docs, write_jsonl
from tests.postroom.jobrows import make_job, shard_row
from tests.stack import worker_stats
from tests.waiting import wait_until

pytestmark = pytest.mark.usefixtures("worker")


def _result_objects(storage: Storage, job_id: str, shards: int) -> list[bytes]:
    return [storage.get_bytes(result_shard_key(uuid.UUID(job_id), n)) for n in range(shards)]


@pytest.fixture(scope="module")
def finished_job(
    api_url: str,
    env: dict[str, str],
    sessions: sessionmaker[Session],
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Any]:
    """1,000 documents submitted with the documented CLI command, waited for with --wait."""
    from postroom.tenants import create_key

    with sessions.begin() as session:
        key = create_key(session=session, tenant=f"cli-{uuid.uuid4().hex[:8]}")
    path = write_jsonl(tmp_path_factory.mktemp("cli") / "docs.jsonl", make_docs(1000))
    proc = subprocess.run(
        postroom_command(
            "submit",
            str(path),
            "--labels",
            ",".join(LABELS),
            "--wait",
            "--api-url",
            api_url,
            "--key",
            key,
        ),
        env={**env},
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    job_id = proc.stdout.strip().splitlines()[-1]
    client = Client(api_url, key)
    return {"id": job_id, "client": client, "job": client.job(job_id), "stdout": proc.stdout}


def test_thousand_documents_complete(
    finished_job: dict[str, Any], sessions: sessionmaker[Session], storage: Storage
) -> None:
    job_id = finished_job["id"]
    job = finished_job["job"]
    # Then: the job is completed and every document is counted
    assert job["status"] == "completed"
    assert job["counts"]["total"] == 1000
    assert job["counts"]["succeeded"] + job["counts"]["failed"] == 1000
    assert job["counts"]["pending"] == 0
    # … with one row per document in Postgres
    with sessions() as session:
        rows = session.scalar(
            select(func.count()).select_from(Result).where(Result.job_id == uuid.UUID(job_id))
        )
        labels = set(
            session.scalars(select(Result.label).where(Result.job_id == uuid.UUID(job_id)))
        )
    assert rows == 1000
    assert labels <= set(LABELS)
    # … 1,000 lines across its S3 result objects
    objects = _result_objects(storage, job_id, job["shards"])
    lines = [json.loads(line) for body in objects for line in body.splitlines()]
    assert len(lines) == 1000
    assert {line["id"] for line in lines} == {f"d{i:06d}" for i in range(1000)}
    assert all(line["label"] in LABELS for line in lines)
    assert all(0 < line["confidence"] <= 1 for line in lines)
    assert all(abs(sum(line["distribution"].values()) - 1) < 1e-3 for line in lines)
    # … and the API streams 1,000 results
    streamed = list(finished_job["client"].results(job_id))
    assert len(streamed) == 1000
    assert {r["id"] for r in streamed} == {line["id"] for line in lines}
    # … and the CLI printed the label table
    assert "succeeded 1,000" in finished_job["stdout"] or "1,000" in finished_job["stdout"]


def test_several_shards_share_the_engine(
    finished_job: dict[str, Any], sessions: sessionmaker[Session]
) -> None:
    # The engine adapter records how many distinct shards had documents in the engine at once.
    stats = worker_stats(sessions)
    # Other tests' workers (other aliases) report in the same table: only the tiny engines count.
    seen = max(
        s["engines"]["tiny"]["max_shards_in_flight"]
        for s in stats
        if "tiny" in (s.get("engines") or {})
    )
    assert seen >= 4, stats


def test_same_shard_twice_rewrites_and_never_duplicates(
    finished_job: dict[str, Any],
    settings: Settings,
    sessions: sessionmaker[Session],
    storage: Storage,
) -> None:
    job_id = uuid.UUID(finished_job["id"])
    shards = finished_job["job"]["shards"]
    before = _result_objects(storage, str(job_id), shards)
    celery = make_celery(settings)
    # Given: a duplicate delivery of every shard (the claim makes it a no-op) …
    for shard_no in range(shards):
        publish_shard(celery, job_id=str(job_id), shard_no=shard_no, queue=gpu_queue("tiny"))
    # … and a real second run of every shard, as after a worker died past its lease
    with sessions.begin() as session:
        session.execute(update(Shard).where(Shard.job_id == job_id).values(state="expired"))
    for shard_no in range(shards):
        publish_shard(celery, job_id=str(job_id), shard_no=shard_no, queue=gpu_queue("tiny"))

    def all_rerun() -> bool:
        with sessions() as session:
            states = session.execute(
                select(Shard.state, Shard.attempt).where(Shard.job_id == job_id)
            ).all()
        return all(state == "done" and attempt == 2 for state, attempt in states)

    wait_until(all_rerun, timeout=120, what="every shard worked a second time")
    with sessions() as session:
        rows = session.scalar(
            select(func.count()).select_from(Result).where(Result.job_id == job_id)
        )
        attempts = set(session.scalars(select(Result.attempt).where(Result.job_id == job_id)))
    # Then: still exactly 1,000 rows, all rewritten by the second attempt, same S3 bytes
    assert rows == 1000
    assert attempts == {2}
    assert _result_objects(storage, str(job_id), shards) == before
    job = finished_job["client"].job(str(job_id))
    assert job["counts"]["succeeded"] + job["counts"]["failed"] == 1000


def test_cli_results_and_status(
    finished_job: dict[str, Any], api_url: str, env: dict[str, str]
) -> None:
    client: Client = finished_job["client"]
    key = client.http.headers["Authorization"].split()[1]
    out = subprocess.run(
        postroom_command("results", finished_job["id"], "--api-url", api_url, "--key", key),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert len(out.splitlines()) == 1000
    status = subprocess.run(
        postroom_command(
            "status", finished_job["id"], "--json", "--api-url", api_url, "--key", key
        ),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert json.loads(status)["status"] == "completed"


def test_a_shard_claimed_after_its_job_was_cancelled_ends_cancelled_without_results(
    settings: Settings, sessions: sessionmaker[Session], storage: Storage
) -> None:
    # Given a cancelled job with a shard the cancel could not stop: a claim held its row lock, so
    # the cancel skipped it (postroom.cancelling), and its input is in S3
    job_id = make_job(sessions, sizes=(3,), queue=gpu_queue("tiny"))
    inputs = [{"id": f"c-{n}", "text": f"text {n}", "line": n} for n in (1, 2, 3)]
    storage.put_bytes(input_shard_key(job_id, 0), encode_jsonl(inputs))
    with sessions.begin() as session:
        session.execute(update(Job).where(Job.id == job_id).values(status="cancelled"))
        # A crash behind it makes it a suspect, claimed by name (a claim by policy passes over
        # a cancelled job's shards): the worker then holds a shard of a cancelled job
        session.execute(
            update(Shard).where(Shard.job_id == job_id).values(state="expired", attempt=1)
        )
    # When the worker claims it
    publish_shard(make_celery(settings), job_id=str(job_id), shard_no=0, queue=gpu_queue("tiny"))

    def ended() -> Shard | None:
        shard = shard_row(sessions, job_id, 0)
        return shard if shard.attempt == 2 and shard.state != "running" else None

    shard = wait_until(ended, timeout=60, what="the worker to end the shard")
    # Then it ends cancelled, with no inference and no result rows: its documents count as
    # cancelled, not as failed
    assert shard.state == "cancelled"
    with sessions() as session:
        rows = session.scalar(
            select(func.count()).select_from(Result).where(Result.job_id == job_id)
        )
        counts = job_counts(session=session, job=session.get_one(Job, job_id))
    assert rows == 0
    assert (counts.cancelled, counts.failed, counts.succeeded) == (3, 0, 0)
