"""Streamed JSONL uploads: bad lines are named by number; `on_invalid=skip` runs without them."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from postroom.db.models import Job, Shard
from postroom.deletion import purge_job
from postroom.domain import ShardState
from postroom.keys import result_shard_key
from postroom.settings import Settings
from postroom.storage import Storage
from postroom_cli.client import Client
from tests.helpers import LABELS, make_docs, wait_for_status
from tests.waiting import wait_until

pytestmark = pytest.mark.usefixtures("worker")

GOOD = [json.dumps({"id": f"g{i}", "text": f"my invoice {i} is wrong"}).encode() for i in range(5)]
BAD_LINES = {
    2: b"{not json",
    4: json.dumps({"id": "x1"}).encode(),  # no text
    5: json.dumps({"id": "g0", "text": "duplicate id"}).encode(),
    7: b'{"id": "x2", "text": "caf\xe9 latte"}',  # latin-1, not UTF-8
    8: json.dumps({"id": "x3", "text": ""}).encode(),
}


def _body() -> bytes:
    lines: list[bytes] = []
    good = iter(GOOD)
    for number in range(1, 11):
        lines.append(BAD_LINES.get(number) or next(good, b""))
    return b"\n".join(lines) + b"\n"


def _upload(client: Client, body: bytes, **params: str) -> tuple[int, dict]:  # type: ignore[type-arg]
    response = client.http.post(
        "/v1/jobs/upload",
        params={"labels": ",".join(LABELS), **params},
        content=body,
        headers={"Content-Type": "application/x-ndjson"},
    )
    return response.status_code, response.json()


def test_bad_lines_are_refused_naming_each_line(client: Client) -> None:
    status, body = _upload(client, _body())
    assert status == 422
    error = body["error"]
    assert error["code"] == "invalid_documents"
    assert "on_invalid=skip" in error["message"]
    by_line = {d["line"]: d for d in error["details"]}
    assert set(by_line) == set(BAD_LINES)
    assert "not valid JSON" in by_line[2]["reason"]
    assert by_line[4]["field"] == "text"
    assert "missing" in by_line[4]["reason"]
    assert "duplicate id" in by_line[5]["reason"]
    assert "not UTF-8" in by_line[7]["reason"]
    assert "empty" in by_line[8]["reason"]
    # No job was created
    assert client.jobs()["data"] == []


def test_skip_runs_the_job_and_reports_bad_lines_as_failed(client: Client) -> None:
    status, body = _upload(client, _body(), on_invalid="skip")
    assert status == 201, body
    job = wait_for_status(client, body["id"])
    assert job["status"] == "completed"
    assert job["counts"]["total"] == 10
    assert job["counts"]["failed"] == len(BAD_LINES)
    assert job["counts"]["succeeded"] == 5
    failed = list(client.results(body["id"], only_failed=True))
    assert len(failed) == len(BAD_LINES)
    reasons = " | ".join(r["error"] for r in failed)
    for number in BAD_LINES:
        assert f"line {number}" in reasons
    every = list(client.results(body["id"]))
    assert len(every) == 10
    assert {r["label"] for r in every if not r["error"]} <= set(LABELS)


def test_line_over_the_byte_limit_is_reported_not_buffered(client: Client) -> None:
    huge = json.dumps({"id": "big", "text": "a" * 1_100_000}).encode()
    status, body = _upload(client, GOOD[0] + b"\n" + huge + b"\n" + GOOD[1] + b"\n")
    assert status == 422
    (detail,) = body["error"]["details"]
    assert detail["line"] == 2
    assert "POSTROOM_MAX_DOCUMENT_BYTES" in detail["reason"]


def test_empty_upload_is_refused(client: Client) -> None:
    status, body = _upload(client, b"")
    assert status == 422
    assert "no documents" in body["error"]["message"]


def test_multipart_file_upload(client: Client) -> None:
    response = client.http.post(
        "/v1/jobs/upload",
        params={"labels": ",".join(LABELS)},
        files={"file": ("docs.jsonl", b"\n".join(GOOD) + b"\n", "application/x-ndjson")},
    )
    assert response.status_code == 201, response.text
    job = wait_for_status(client, response.json()["id"])
    assert job["counts"]["succeeded"] == 5


def _streamed(docs: list[dict], pause_after: int, pause: Callable[[], object]) -> Iterator[bytes]:  # type: ignore[type-arg]
    """The body one line at a time, calling `pause` (which waits) after line `pause_after`."""
    for number, doc in enumerate(docs, start=1):
        yield (json.dumps(doc) + "\n").encode()
        if number == pause_after:
            pause()


def _early_job(sessions: sessionmaker[Session]) -> Job | None:
    """A job that is still receiving and has a finished shard, if any (tests run one by one)."""
    with sessions() as session:
        return session.execute(
            select(Job)
            .join(Shard, Shard.job_id == Job.id)
            .where(
                Job.status == "validating",
                Shard.state == ShardState.done,
            )
            .limit(1)
        ).scalar_one_or_none()


def test_shards_run_while_the_upload_still_streams(
    client: Client, sessions: sessionmaker[Session], storage: Storage
) -> None:
    docs = make_docs(1000, prefix="early")
    seen: list[Job] = []

    def first_shard_done() -> None:  # the body stays open until a shard is classified
        seen.append(wait_until(lambda: _early_job(sessions), timeout=20, what="a shard"))

    response = client.http.post(
        "/v1/jobs/upload",
        params={"labels": ",".join(LABELS)},
        content=_streamed(docs, 600, first_shard_done),
        headers={"Content-Type": "application/x-ndjson"},
    )
    assert response.status_code == 201, response.text
    job_id = response.json()["id"]
    assert str(seen[0].id) == job_id  # the same job, working before its last line was sent
    job = wait_for_status(client, job_id)
    assert (job["status"], job["counts"]["succeeded"], job["shards"]) == ("completed", 1000, 10)
    results = list(client.results(job_id))
    assert sorted(r["id"] for r in results) == sorted(d["id"] for d in docs)
    lines = [
        line
        for shard_no in range(10)
        for line in storage.iter_jsonl(result_shard_key(uuid.UUID(job_id), shard_no))
    ]
    assert sorted(line["id"] for line in lines) == sorted(d["id"] for d in docs)


def test_an_early_started_upload_refused_at_its_end_leaves_no_job(
    client: Client, sessions: sessionmaker[Session], storage: Storage, settings: Settings
) -> None:
    docs = [*make_docs(400, prefix="late-bad"), {"id": "x", "text": ""}]
    seen: list[Job] = []

    def first_shard_done() -> None:
        seen.append(wait_until(lambda: _early_job(sessions), timeout=20, what="a shard"))

    response = client.http.post(
        "/v1/jobs/upload",
        params={"labels": ",".join(LABELS)},
        content=_streamed(docs, 300, first_shard_done),
        headers={"Content-Type": "application/x-ndjson"},
    )
    assert response.status_code == 422, response.text
    assert response.json()["error"]["details"][0]["line"] == 401
    job_id = seen[0].id
    assert client.http.get(f"/v1/jobs/{job_id}").status_code == 404
    assert str(job_id) not in {j["id"] for j in client.jobs()["data"]}
    with sessions() as session:
        row = session.get_one(Job, job_id)
        assert (row.status, row.deleted_at is not None) == ("cancelled", True)

    # The purge (the beat's) then removes its rows and every object it wrote, once no worker
    # still holds one of its shards.
    def purged() -> bool:
        purge_job(
            sessions,
            storage,
            job_id=job_id,
            batch_rows=settings.delete_batch_rows,
            inbox_prefix=settings.inbox_prefix,
        )
        with sessions() as session:
            return session.get(Job, job_id) is None

    wait_until(purged, timeout=60, what="the withdrawn job purged")
    assert storage.list_page(f"inputs/{job_id}/")[0] == []
