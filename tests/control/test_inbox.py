"""The S3 drop folder: files dropped into `inbox/<name>/` become jobs exactly once, results land in
`outbox/`, inputs in `done/` or `failed/` with a reason. Real moto S3, Postgres, Redis and worker;
`postroom beat` as a subprocess, or the tick called directly where a test needs determinism.

The 200,000-line test checks streamed ingestion (memory, shard count) by default; set
POSTROOM_TEST_INBOX_FULL=1 to also run that job to the end (about 10 minutes on 2 CPU cores).
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import threading
import time
import tracemalloc
import uuid
import warnings
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import func, select, update
from sqlalchemy.exc import SAWarning
from sqlalchemy.orm import Session, sessionmaker

from control.inbox import DropObject, InboxDeps, TickReport, ingest_event, ingest_object, run_tick
from control.inbox.rows import claim_new
from control.reaper import reap
from postroom.db.inbox_models import InboxObject
from postroom.db.models import Job, Shard
from postroom.job_options import JobOptions, prepare_spec
from postroom.jobs import cancel_job
from postroom.keys import drop_area, drop_key, input_shard_key
from postroom.queue import make_celery
from postroom.settings import Settings
from postroom.storage import Storage
from postroom_cli.local import free_port, postroom_command, spawn, stop
from tests.helpers import LABELS, make_docs
from tests.waiting import wait_until

pytestmark = pytest.mark.usefixtures("worker")

JOB = {"labels": LABELS, "model": "tiny", "instructions": "Route the support ticket."}
FULL = os.environ.get("POSTROOM_TEST_INBOX_FULL") == "1"


# -- helpers


def jsonl(docs: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(d) + "\n" for d in docs).encode()


def put(storage: Storage, key: str, body: bytes) -> str:
    return storage.client.put_object(Bucket=storage.bucket, Key=key, Body=body)["ETag"].strip('"')


def keys_under(storage: Storage, prefix: str) -> list[str]:
    pages = storage.client.get_paginator("list_objects_v2").paginate(
        Bucket=storage.bucket, Prefix=prefix
    )
    return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


def read_lines(storage: Storage, key: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in storage.get_bytes(key).splitlines()]


def rows(sessions: sessionmaker[Session], prefix: str) -> list[InboxObject]:
    with sessions() as session:
        return list(
            session.scalars(
                select(InboxObject)
                .where(InboxObject.key.startswith(drop_area(prefix, "inbox")))
                .order_by(InboxObject.key, InboxObject.seen_at)
            )
        )


def jobs_with_ids(sessions: sessionmaker[Session], ids: list[uuid.UUID]) -> int:
    with sessions() as session:
        return int(
            session.scalar(select(func.count()).select_from(Job).where(Job.id.in_(ids))) or 0
        )


def inbox_settings(settings: Settings, **overrides: Any) -> Settings:
    update = {
        "inbox_prefix": f"drop-{uuid.uuid4().hex[:8]}",
        "inbox_settle_seconds": 0.0,
        "inbox_interval_seconds": 0.2,
        "republish_grace_seconds": 2.0,
        **overrides,
    }
    return settings.model_copy(update=update)


@pytest.fixture
def deps(
    settings: Settings, sessions: sessionmaker[Session], storage: Storage
) -> Iterator[InboxDeps]:
    inbox = inbox_settings(settings)
    celery = make_celery(inbox)
    yield InboxDeps(inbox, sessions, storage, celery)
    celery.close()


def tick_until_settled(deps: InboxDeps, *, timeout: float = 120) -> list[InboxObject]:
    """Tick until every object of the test's inbox is done or failed. The reaper runs too, as in
    `postroom beat`: it rings again for shards whose message was lost."""
    broker = redis.Redis.from_url(deps.settings.broker_url)

    def settled() -> list[InboxObject] | None:
        run_tick(deps)
        with warnings.catch_warnings():
            # worker/reaper.py's select(distinct(…)) warns under SQLAlchemy 2.1 (not ours), and
            # pytest turns warnings into errors.
            warnings.simplefilter("ignore", SAWarning)
            reap(
                sessions=deps.sessions,
                celery=deps.celery,
                redis=broker,
                storage=deps.storage,
                settings=deps.settings,
            )
        found = rows(deps.sessions, deps.prefix)
        return found if found and all(r.state in ("done", "failed") for r in found) else None

    try:
        return wait_until(settled, timeout=timeout, what=f"inbox {deps.prefix} settled")
    finally:
        broker.close()


# -- the watcher process: three files, a broken folder, a file that is not JSONL


@pytest.fixture(scope="module")
def dropped(
    env: dict[str, str],
    settings: Settings,
    storage: Storage,
    sessions: sessionmaker[Session],
    logs_dir: Path,
) -> dict[str, Any]:
    """Drop four folders, run `postroom beat` until every object settled, stop it."""
    prefix = f"drop-{uuid.uuid4().hex[:8]}"
    files = {
        "tickets/a.jsonl": make_docs(40, seed=1, prefix="a"),
        "tickets/b.jsonl": make_docs(75, seed=2, prefix="b"),
        "tickets/c.jsonl.gz": make_docs(130, seed=3, prefix="c"),
        "mixed/ok.jsonl": make_docs(12, seed=4, prefix="m"),
    }
    put(storage, drop_key(prefix, "inbox", "tickets", "job.json"), json.dumps(JOB).encode())
    put(storage, drop_key(prefix, "inbox", "mixed", "job.json"), json.dumps(JOB).encode())
    put(storage, drop_key(prefix, "inbox", "broken", "job.json"), b'{"labels": ["a", "b"],')
    for path, docs in files.items():
        body = gzip.compress(jsonl(docs)) if path.endswith(".gz") else jsonl(docs)
        put(storage, f"{prefix}/inbox/{path}", body)
    put(storage, f"{prefix}/inbox/broken/x.jsonl", jsonl(make_docs(5, prefix="x")))
    put(storage, f"{prefix}/inbox/broken/y.jsonl", jsonl(make_docs(5, prefix="y")))
    put(storage, f"{prefix}/inbox/mixed/notes.jsonl", b"id,text\n1,my invoice is wrong\n")
    beat_env = {
        **env,
        "POSTROOM_INBOX_PREFIX": prefix,
        "POSTROOM_INBOX_INTERVAL_SECONDS": "1",
        "POSTROOM_INBOX_SETTLE_SECONDS": "0.5",
    }
    beat = spawn(postroom_command("beat"), env=beat_env, log=logs_dir / "beat-inbox.log")
    try:

        def settled() -> list[InboxObject] | None:
            found = rows(sessions, prefix)
            done = len(found) == 7 and all(r.state in ("done", "failed") for r in found)
            return found if done else None

        found = wait_until(settled, timeout=180, what="inbox settled under beat", alive=beat)
    finally:
        stop(beat)
    return {"prefix": prefix, "files": files, "rows": {r.key: r for r in found}}


def test_three_files_become_three_jobs_with_one_result_line_per_input_line(
    dropped: dict[str, Any], storage: Storage, sessions: sessionmaker[Session]
) -> None:
    prefix, files = dropped["prefix"], dropped["files"]
    tickets = {p: d for p, d in files.items() if p.startswith("tickets/")}
    objects = [dropped["rows"][f"{prefix}/inbox/{p}"] for p in tickets]
    # Then: three jobs, one per file, each done
    assert [o.state for o in objects] == ["done"] * 3
    job_ids = [o.job_id for o in objects]
    assert len(set(job_ids)) == 3
    assert None not in job_ids
    with sessions() as session:
        jobs = {j.id: j for j in session.scalars(select(Job).where(Job.id.in_(job_ids)))}
    for obj, docs in zip(objects, tickets.values(), strict=True):
        job = jobs[obj.job_id]  # type: ignore[index]
        assert (job.status, job.total_docs) == ("completed", len(docs))
        # … whose results sit in the outbox: one line per input line, in input order
        file = obj.file
        lines = read_lines(storage, drop_key(prefix, "outbox", "tickets", f"{file}.results.jsonl"))
        assert [line["id"] for line in lines] == [d["id"] for d in docs]
        assert all(line["label"] in LABELS and line["error"] is None for line in lines)
        assert set(lines[0]) >= {"id", "label", "confidence", "route", "model", "error"}
    # … and the inputs moved to done/; only job.json stays in the inbox
    assert keys_under(storage, drop_area(prefix, "done") + "tickets/") == sorted(
        f"{prefix}/done/{p}" for p in tickets
    )
    assert keys_under(storage, drop_area(prefix, "inbox") + "tickets/") == [
        f"{prefix}/inbox/tickets/job.json"
    ]


def test_broken_job_json_fails_every_file_of_its_folder_with_what_to_fix(
    dropped: dict[str, Any], storage: Storage
) -> None:
    prefix = dropped["prefix"]
    for file in ("x.jsonl", "y.jsonl"):
        row = dropped["rows"][f"{prefix}/inbox/broken/{file}"]
        assert (row.state, row.job_id) == ("failed", None)
        reason = storage.get_bytes(drop_key(prefix, "failed", "broken", f"{file}.reason.txt"))
        assert b"broken/job.json is not valid JSON" in reason
        assert b"line 1, column" in reason
        assert b"Fix it" in reason
        assert storage.get_bytes(drop_key(prefix, "failed", "broken", file))
    assert keys_under(storage, drop_area(prefix, "inbox") + "broken/") == [
        f"{prefix}/inbox/broken/job.json"
    ]


def test_a_file_that_is_not_jsonl_fails_while_its_folder_keeps_flowing(
    dropped: dict[str, Any], storage: Storage
) -> None:
    prefix = dropped["prefix"]
    assert dropped["rows"][f"{prefix}/inbox/mixed/notes.jsonl"].state == "failed"
    reason = storage.get_bytes(drop_key(prefix, "failed", "mixed", "notes.jsonl.reason.txt"))
    assert b"notes.jsonl is not JSONL" in reason
    assert b"line 1" in reason
    assert dropped["rows"][f"{prefix}/inbox/mixed/ok.jsonl"].state == "done"
    results = read_lines(storage, drop_key(prefix, "outbox", "mixed", "ok.jsonl.results.jsonl"))
    assert len(results) == 12


def test_inbox_status_lists_states_and_reasons(
    dropped: dict[str, Any], env: dict[str, str]
) -> None:
    proc = subprocess.run(
        postroom_command("inbox", "status", "--json", "--limit", "1000"),
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["counts"]["done"] >= 4
    assert report["counts"]["failed"] >= 3
    ours = {o["key"]: o for o in report["objects"] if o["key"].startswith(dropped["prefix"])}
    assert len(ours) == 7
    failed = {k: o["reason"] for k, o in ours.items() if o["state"] == "failed"}
    assert len(failed) == 3
    assert all(failed.values())
    done = [o for o in ours.values() if o["state"] == "done"]
    assert all(o["job_status"] == "completed" for o in done)


# -- exactly once, with the tick called directly


def test_two_ticks_at_once_create_each_job_once(deps: InboxDeps, storage: Storage) -> None:
    # Given: four files in one folder
    put(storage, drop_key(deps.prefix, "inbox", "race", "job.json"), json.dumps(JOB).encode())
    for n in range(4):
        put(storage, drop_key(deps.prefix, "inbox", "race", f"f{n}.jsonl"), jsonl(make_docs(7)))
    # When: two ticks run at once on the same listing
    barrier = threading.Barrier(2)
    reports: list[TickReport] = []

    def tick() -> None:
        barrier.wait(timeout=30)
        reports.append(run_tick(deps))

    threads = [threading.Thread(target=tick) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    # Then: each object was ingested by exactly one of them, into one job
    assert len(reports) == 2
    assert [r.listed for r in reports] == [4, 4]
    assert sum(r.outcomes.get("ingested", 0) for r in reports) == 4
    found = rows(deps.sessions, deps.prefix)
    assert len(found) == 4
    assert all(r.job_id == r.id for r in found)
    assert jobs_with_ids(deps.sessions, [r.id for r in found]) == 4
    # … and each finishes once
    settled = tick_until_settled(deps)
    assert [r.state for r in settled] == ["done"] * 4
    assert len(keys_under(storage, drop_area(deps.prefix, "outbox"))) == 4


def test_a_tick_that_died_mid_ingest_is_retried_and_the_late_one_makes_no_second_job(
    deps: InboxDeps, storage: Storage
) -> None:
    put(storage, drop_key(deps.prefix, "inbox", "crash", "job.json"), json.dumps(JOB).encode())
    key = drop_key(deps.prefix, "inbox", "crash", "a.jsonl")
    etag = put(storage, key, jsonl(make_docs(250)))
    obj = DropObject(deps.bucket, key, etag, 0, folder="crash", file="a.jsonl")
    # Given: tick A claimed the object, then stalled (or died) past its lease
    with deps.sessions.begin() as session:
        stalled = claim_new(session=session, obj=obj, lease_seconds=600)
        session.execute(
            update(InboxObject)
            .where(InboxObject.id == obj.id)
            .values(lease_until=func.now() - timedelta(seconds=1))
        )
    assert stalled == 1
    # When: a later tick takes it over
    report = run_tick(deps)
    assert report.outcomes == {"ingested": 1}
    # … and A wakes up and finishes its ingest
    assert ingest_object(deps, obj, attempt=stalled) == "lost"
    # Then: one job, whose input shards A did not delete
    assert jobs_with_ids(deps.sessions, [obj.id]) == 1
    assert storage.get_bytes(input_shard_key(obj.id, 2))
    assert [r.state for r in tick_until_settled(deps)] == ["done"]


def test_a_new_etag_is_a_new_job_and_the_same_content_is_not(
    deps: InboxDeps, storage: Storage
) -> None:
    put(storage, drop_key(deps.prefix, "inbox", "again", "job.json"), json.dumps(JOB).encode())
    key = drop_key(deps.prefix, "inbox", "again", "docs.jsonl")
    first = jsonl(make_docs(9, seed=1, prefix="v1-"))
    put(storage, key, first)
    [v1] = tick_until_settled(deps)
    assert v1.state == "done"
    # When: the same bytes are uploaded again
    put(storage, key, first)
    report = run_tick(deps)
    # Then: no new job; the copy goes to failed/ saying where the results are
    assert report.outcomes == {"duplicate": 1}
    assert len(rows(deps.sessions, deps.prefix)) == 1
    reason = storage.get_bytes(drop_key(deps.prefix, "failed", "again", "docs.jsonl.reason.txt"))
    assert b"already processed as job" in reason
    # When: different content is uploaded under the same key
    etag = put(storage, key, jsonl(make_docs(11, seed=2, prefix="v2-")))
    settled = tick_until_settled(deps)
    # Then: a second job, for the new version only
    assert len(settled) == 2
    assert {r.state for r in settled} == {"done"}
    v2 = next(r for r in settled if r.etag == etag)
    assert v2.job_id not in (None, v1.job_id)
    results = drop_key(deps.prefix, "outbox", "again", "docs.jsonl.results.jsonl")
    assert [line["id"][:3] for line in read_lines(storage, results)] == ["v2-"] * 11


def test_event_records_end_in_the_same_ingest(deps: InboxDeps, storage: Storage) -> None:
    put(storage, drop_key(deps.prefix, "inbox", "events", "job.json"), json.dumps(JOB).encode())
    key = drop_key(deps.prefix, "inbox", "events", "from event.jsonl")
    etag = put(storage, key, jsonl(make_docs(5)))
    record = {  # as S3 sends it: the key URL-encoded, the ETag unquoted
        "eventName": "ObjectCreated:Put",
        "s3": {
            "bucket": {"name": deps.bucket},
            "object": {"key": key.replace(" ", "+"), "eTag": etag, "size": 10},
        },
    }
    assert ingest_event(record, deps=deps) == "ingested"
    assert ingest_event(record, deps=deps) == "skipped"
    assert run_tick(deps).outcomes == {"skipped": 1}
    removed = {**record, "eventName": "ObjectRemoved:Delete"}
    assert ingest_event(removed, deps=deps) == "ignored"
    [row] = rows(deps.sessions, deps.prefix)
    assert row.key == key
    assert jobs_with_ids(deps.sessions, [row.id]) == 1


def test_unusable_objects_fail_with_reasons_and_a_missing_job_json_waits(
    settings: Settings, sessions: sessionmaker[Session], storage: Storage
) -> None:
    deps = InboxDeps(
        inbox_settings(settings, inbox_max_decompressed_bytes=1024 * 1024),
        sessions,
        storage,
        make_celery(settings),
    )
    good, p = json.dumps(JOB).encode(), deps.prefix
    put(storage, drop_key(p, "inbox", "bomb", "job.json"), good)
    put(
        storage,
        drop_key(p, "inbox", "bomb", "big.jsonl.gz"),
        gzip.compress(b'{"text":"a"}\n' * 400_000),
    )
    put(storage, drop_key(p, "inbox", "typo", "job.json"), b'{"lables": ["a", "b"]}')
    put(storage, drop_key(p, "inbox", "typo", "a.jsonl"), jsonl(make_docs(3)))
    put(storage, drop_key(p, "inbox", "lines", "job.json"), good)
    bad_lines = jsonl(make_docs(3)) + b'{"id": "x"}\nnot json\n'
    put(storage, drop_key(p, "inbox", "lines", "a.jsonl"), bad_lines)
    put(storage, drop_key(p, "inbox", "later", "a.jsonl"), jsonl(make_docs(3)))
    naive = json.dumps({**JOB, "deadline": "2030-01-01T00:00:00"}).encode()
    put(storage, drop_key(p, "inbox", "naive", "job.json"), naive)
    put(storage, drop_key(p, "inbox", "naive", "a.jsonl"), jsonl(make_docs(3)))
    put(storage, drop_key(p, "inbox", "", "loose.jsonl"), jsonl(make_docs(3)))
    # When: one tick
    report = run_tick(deps)
    assert report.outcomes == {"failed": 5, "waiting": 1}
    reasons = {r.key.removeprefix(drop_area(p, "inbox")): r.reason or "" for r in rows(sessions, p)}
    # Then: each failure says what to fix, in the database and next to the file in failed/
    assert "decompresses to more than 1,048,576 bytes" in reasons["bomb/big.jsonl.gz"]
    assert "lables" in reasons["typo/a.jsonl"]
    assert "Allowed fields" in reasons["typo/a.jsonl"]
    assert "line 4" in reasons["lines/a.jsonl"]
    assert "line 5" in reasons["lines/a.jsonl"]
    assert '"on_invalid": "skip"' in reasons["lines/a.jsonl"]
    assert "put data files in a folder" in reasons["loose.jsonl"]
    assert "deadline needs a timezone" in reasons["naive/a.jsonl"]
    assert "waiting for" in reasons["later/a.jsonl"]
    # … and the shards the bomb had written before it was caught are gone
    bomb = next(r for r in rows(sessions, p) if r.file == "big.jsonl.gz")
    assert keys_under(storage, f"inputs/{bomb.id}/") == []
    for key in (k for k, reason in reasons.items() if not reason.startswith("waiting")):
        stored = storage.get_bytes(f"{drop_area(p, 'failed')}{key}.reason.txt").decode()
        assert stored.strip() == reasons[key].strip()
    # When: the missing job.json arrives, the waiting file flows
    put(storage, drop_key(p, "inbox", "later", "job.json"), good)
    wait_until(
        lambda: run_tick(deps).outcomes.get("ingested"), timeout=30, what="waiting file ingested"
    )
    deps.celery.close()


def test_a_truncated_gzip_file_fails_and_says_so(deps: InboxDeps, storage: Storage) -> None:
    put(storage, drop_key(deps.prefix, "inbox", "cut", "job.json"), json.dumps(JOB).encode())
    blob = gzip.compress(jsonl(make_docs(50)))
    put(storage, drop_key(deps.prefix, "inbox", "cut", "a.jsonl.gz"), blob[:-9])
    # When: one tick
    assert run_tick(deps).outcomes == {"failed": 1}
    # Then: the object failed, and its reason says the file is truncated
    [row] = rows(deps.sessions, deps.prefix)
    assert row.state == "failed"
    assert "a.jsonl.gz is a truncated gzip" in (row.reason or "")
    reason = storage.get_bytes(drop_key(deps.prefix, "failed", "cut", "a.jsonl.gz.reason.txt"))
    assert b"truncated" in reason
    assert keys_under(storage, f"inputs/{row.id}/") == []


# -- a 200,000-line file, streamed


@pytest.mark.timeout(2400 if FULL else 300)
def test_a_200k_line_file_is_ingested_streamed_with_bounded_memory(
    deps: InboxDeps, storage: Storage, tmp_path: Path, record_property: Any
) -> None:
    count = 200_000
    path = tmp_path / "big.jsonl.gz"
    with gzip.open(path, "wb", compresslevel=6) as out:
        for n in range(count):
            out.write(b'{"id":"%d","text":"my invoice %d was charged twice"}\n' % (n, n % 997))
    put(storage, drop_key(deps.prefix, "inbox", "big", "job.json"), json.dumps(JOB).encode())
    key = drop_key(deps.prefix, "inbox", "big", "big.jsonl.gz")
    etag = put(storage, key, path.read_bytes())
    obj = DropObject(deps.bucket, key, etag, path.stat().st_size, folder="big", file=path.name)
    if not FULL:
        # No broker behind this port: the shards stay unpublished (and are cancelled below), so
        # the default run does not keep the shared worker busy for ten minutes.
        nowhere = deps.settings.model_copy(
            update={"broker_url": f"redis://127.0.0.1:{free_port()}/0"}
        )
        deps = InboxDeps(deps.settings, deps.sessions, deps.storage, make_celery(nowhere))
    with deps.sessions() as session:  # load the tokenizer before measuring
        prepare_spec(JobOptions.model_validate(JOB), session=session, settings=deps.settings)
    with deps.sessions.begin() as session:
        attempt = claim_new(session=session, obj=obj, lease_seconds=600)
    assert attempt == 1
    # When: the object is ingested, with Python's allocations traced
    tracemalloc.start()
    started = time.monotonic()
    outcome = ingest_object(deps, obj, attempt=attempt)
    seconds = time.monotonic() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    record_property("inbox_ingest_seconds", round(seconds, 2))
    record_property("inbox_ingest_peak_mib", round(peak / 2**20, 1))
    # Then: one job of 200,000 documents in full shards, and memory stayed bounded
    assert outcome == "ingested"
    assert peak < 100 * 1024 * 1024, f"peak {peak / 2**20:.1f} MiB"
    shard_size = deps.settings.shard_size
    with deps.sessions() as session:
        job = session.get_one(Job, obj.id)
        shards = session.scalar(
            select(func.count()).select_from(Shard).where(Shard.job_id == obj.id)
        )
    assert (job.total_docs, job.shard_count, shards) == (
        count,
        count // shard_size,
        count // shard_size,
    )
    inputs = keys_under(storage, f"inputs/{obj.id}/")
    assert len(inputs) == count // shard_size
    assert seconds < 240, f"ingest took {seconds:.0f}s ({count / seconds:,.0f} docs/s)"
    if not FULL:
        with deps.sessions.begin() as session:
            cancel_job(session=session, tenant_id=job.tenant_id, job_id=obj.id)
        deps.celery.close()
        return
    # Opt-in: the whole job runs and its 200,000 results land in the outbox
    [row] = tick_until_settled(deps, timeout=1800)
    assert row.state == "done"
    results = drop_key(deps.prefix, "outbox", "big", "big.jsonl.gz.results.jsonl")
    body = storage.client.get_object(Bucket=storage.bucket, Key=results)["Body"]
    assert sum(1 for _ in body.iter_lines()) == count
