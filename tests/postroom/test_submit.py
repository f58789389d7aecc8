"""Submission against real Postgres and S3 (moto server): refusals leave nothing behind, a repeat
is the same job, background shard writes, the label check's tokenizer (no torch in the API)."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import uuid
from datetime import UTC
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import func
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session, sessionmaker

from postroom.db.models import Job, Worker
from postroom.errors import InvalidDocuments
from postroom.job_options import JobOptions
from postroom.keys import input_shard_key, rejected_lines_key
from postroom.partitions import job_partition_name
from postroom.settings import Settings
from postroom.shard_writer import ShardWriter
from postroom.storage import Storage
from postroom.submit import Submission
from postroom.tenants import ensure_tenant
from postroom.tokens import load

pytestmark = pytest.mark.usefixtures("stop_jobs_made_here")

LABELS = ["billing", "bills", "bug report", "bugfix", "praise", "question", "refund", "other"]


def test_shards_are_written_in_the_background_with_a_bounded_backlog(storage: Storage) -> None:
    job_id = uuid.uuid4()
    writer = ShardWriter(storage, job_id, in_flight=2)
    for shard_no in range(9):
        writer(shard_no, [{"id": f"{shard_no}-{i}", "text": "t", "line": i} for i in range(3)])
        assert len(writer._futures) <= 2
        if writer.backlogged:
            writer.drain()
    writer.flush()
    assert writer.written == 9
    for shard_no in range(9):
        lines = storage.get_bytes(input_shard_key(job_id, shard_no)).splitlines()
        assert [json.loads(line)["id"] for line in lines] == [f"{shard_no}-{i}" for i in range(3)]
    writer.discard()
    assert (
        list(
            storage.client.list_objects_v2(Bucket=storage.bucket, Prefix=f"inputs/{job_id}/").get(
                "Contents", []
            )
        )
        == []
    )


def test_a_failed_write_surfaces_at_flush(settings: Settings) -> None:
    missing = Storage(settings.model_copy(update={"s3_bucket": f"missing-{uuid.uuid4().hex[:8]}"}))
    writer = ShardWriter(missing, uuid.uuid4())
    writer(0, [{"id": "1", "text": "t", "line": 1}])
    with pytest.raises(Exception, match="NoSuchBucket"):
        writer.flush()


@pytest.mark.parametrize("alias", ["tiny", "minilm"])
def test_the_label_check_tokenizer_equals_transformers(alias: str, tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    path = str(tiny_model_dir) if alias == "tiny" else Settings().model_path(alias)
    fast, slow = load(path), AutoTokenizer.from_pretrained(path)
    assert fast is not None  # both packaged models ship a tokenizer.json
    for text in [*LABELS, "\n\nLabel: billing", "naïve ünïcode 中文", ""]:
        for special in (False, True):
            assert fast.encode(text, add_special_tokens=special) == slow.encode(
                text, add_special_tokens=special
            )


def test_the_api_checks_labels_without_loading_torch() -> None:
    # A subprocess: this test process has torch loaded already by other tests.
    code = (
        "import sys, api.main\n"
        "from postroom.settings import Settings\n"
        "from postroom.labels import label_collisions\n"
        f"label_collisions(Settings().model_path('minilm'), {tuple(LABELS)!r})\n"
        "print(sorted(m for m in ('torch', 'transformers', 'vllm') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- Submission: one path for every way in


def _serve_tiny(sessions: sessionmaker[Session]) -> None:
    """A worker row for `tiny`, as a live worker's heartbeat leaves (no engine needed here)."""
    row = {"name": "gpu@submit-test", "route": "gpu", "models": ["tiny"], "stats": {}}
    with sessions.begin() as session:
        session.execute(
            insert(Worker)
            .values(**row, heartbeat_at=func.now())
            .on_conflict_do_update(index_elements=[Worker.name], set_={"heartbeat_at": func.now()})
        )


def _input_keys(storage: Storage, job_id: uuid.UUID) -> list[str]:
    listed, _ = storage.list_page(f"inputs/{job_id}/")
    return [item.key for item in listed]


def _submission(
    sessions: sessionmaker[Session], storage: Storage, settings: Settings, **options: Any
) -> Submission:
    _serve_tiny(sessions)
    with sessions() as session:
        return Submission.start(
            JobOptions(labels=["a", "b"], model="tiny", **options),
            session=session,
            storage=storage,
            settings=settings.model_copy(update={"shard_size": 2}),
        )


def test_a_refused_submission_leaves_nothing_in_s3(
    sessions: sessionmaker[Session], storage: Storage, settings: Settings
) -> None:
    sub = _submission(sessions, storage, settings)

    def feed_and_seal() -> None:
        with sub:
            for n in range(5):
                sub.add({"id": str(n), "text": f"doc {n}"})
            sub.add({"id": "bad", "text": ""})
            sub.seal()

    with pytest.raises(InvalidDocuments, match="1 document line"):
        feed_and_seal()
    assert sub.intake.shard_sizes == [2, 2, 1]  # shards were written before the refusal…
    assert _input_keys(storage, sub.job_id) == []  # …and deleted with it
    assert sub.job is None


def test_a_stream_is_recorded_once_and_a_repeat_discards_its_shards(
    sessions: sessionmaker[Session], storage: Storage, settings: Settings
) -> None:
    body = b"".join(b'{"id": "%d", "text": "doc %d"}\n' % (n, n) for n in range(3))

    def submit() -> Submission:
        sub = _submission(sessions, storage, settings, on_invalid="skip")
        with sub:
            sub.open_stream(gzip=True, name="docs.jsonl.gz")
            sub.feed(gzip.compress(body + b"not json\n"))
            sub.seal()
        with sessions() as session:
            tenant_id = ensure_tenant(session=session, name="submit-test")
            sub.record(session=session, tenant_id=tenant_id, idempotency_key=key, body_hash="same")
            session.commit()
        return sub

    key = f"k-{uuid.uuid4().hex}"
    first, second = submit(), submit()
    assert first.created
    assert not second.created
    assert second.job is not None
    assert second.job.id == first.job_id
    assert len(_input_keys(storage, first.job_id)) == 2
    assert _input_keys(storage, second.job_id) == []
    with sessions() as session:
        job = session.get_one(Job, first.job_id)
        assert (job.total_docs, job.rejected_docs, job.shard_count) == (4, 1, 2)
    rejected = storage.get_bytes(rejected_lines_key(first.job_id)).decode()
    assert '"line":4' in rejected


def test_a_job_of_at_least_the_threshold_gets_a_partition_of_its_own(
    sessions: sessionmaker[Session], storage: Storage, settings: Settings
) -> None:
    own_from_4 = settings.model_copy(update={"results_own_partition_docs": 4})

    def submit(good: int) -> uuid.UUID:
        sub = _submission(sessions, storage, own_from_4, on_invalid="skip")
        with sub:
            for n in range(good):
                sub.add({"id": str(n), "text": f"doc {n}"})
            sub.add({"id": "bad", "text": ""})
            sub.seal()
        with sessions() as session:
            tenant_id = ensure_tenant(session=session, name="submit-test")
            sub.record(session=session, tenant_id=tenant_id, idempotency_key=None, body_hash="b")
            session.commit()
        return sub.job_id

    big, small = submit(3), submit(1)  # 4 documents (one skipped), and 2
    with sessions() as session:
        jobs = {job_id: session.get_one(Job, job_id) for job_id in (big, small)}
        assert {job_id: job.own_partition for job_id, job in jobs.items()} == {
            big: True,
            small: False,
        }
        # The skipped line's failed result went into the big job's own partition, made for it
        day = jobs[big].created_at.astimezone(UTC).date()
        name = job_partition_name(day, big)
        rows = session.execute(sa.text(f"SELECT doc_id, part FROM {name}")).all()
        assert rows == [("bad", big)]
        assert (
            session.execute(
                sa.text("SELECT to_regclass(:n)"), {"n": job_partition_name(day, small)}
            ).scalar_one()
            is None
        )
