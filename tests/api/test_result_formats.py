"""Results as JSONL, CSV and Parquet: what pandas and DuckDB read back from the API, the CLI and
the reaper's results.parquet equals the JSONL results, row for row."""

from __future__ import annotations

import json
import math
import os
import subprocess
import uuid
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import pyarrow.parquet as pq
import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from control.inbox import InboxDeps
from control.inbox.objects import UnusableObject, parse_job_file
from control.inbox.outputs import upload_parquet
from postroom.db.models import Job
from postroom.exports import export_job_parquet, unexported_jobs
from postroom.intake import Rejected
from postroom.keys import outbox_parquet_key, results_parquet_key
from postroom.result_formats import result_columns
from postroom.settings import Settings
from postroom.storage import Storage
from postroom_cli.client import ApiError, Client
from postroom_cli.local import postroom_command
from tests.finished_jobs import LABELS, finished_job
from tests.postroom.jobrows import make_job
from tests.stack import new_key

DOCS = 100_000
COLUMNS = result_columns(LABELS)


def _plain(value: Any) -> Any:
    """NaN (an empty CSV field, a Parquet null read by pandas) and None compare as None."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return value


def _rows(frame: pd.DataFrame) -> list[tuple[Any, ...]]:
    assert list(frame.columns) == COLUMNS
    return [tuple(_plain(v) for v in row) for row in frame.itertuples(index=False)]


def _expected(jsonl: Path) -> list[tuple[Any, ...]]:
    rows = []
    for text in jsonl.read_text().splitlines():
        line = json.loads(text)
        dist = line.get("distribution") or {}
        base = [line[c] for c in ("id", "label", "confidence", "route", "model", "revision")]
        first = line.get("first") or {}
        cascade = [first.get(c) for c in ("label", "confidence", "route", "model")]
        rows.append(
            (
                *base,
                line["error"],
                *cascade,
                line.get("escalation_error"),
                *(dist.get(label) for label in LABELS),
            )
        )
    return rows


@pytest.fixture(scope="module")
def big_job(sessions: sessionmaker[Session]) -> tuple[uuid.UUID, str]:
    tenant = f"formats-{uuid.uuid4().hex[:8]}"
    key = new_key(sessions, tenant=tenant)
    return finished_job(sessions, tenant=tenant, docs=DOCS, shard_size=5000), key


def test_csv_and_parquet_read_back_equal_to_jsonl(
    big_job: tuple[uuid.UUID, str],
    api_url: str,
    env: dict[str, str],
    tmp_path: Path,
) -> None:
    job_id, key = big_job
    client = Client(api_url, key)
    paths = {fmt: tmp_path / f"results.{fmt}" for fmt in ("jsonl", "csv")}
    for fmt, path in paths.items():
        with path.open("wb") as out:
            client.download_results(str(job_id), out, format=fmt)
    # Parquet through the documented command: `postroom results JOB --format parquet -o FILE`.
    parquet = tmp_path / "results.parquet"
    subprocess.run(
        postroom_command("results", str(job_id), "--format", "parquet", "-o", str(parquet)),
        env={**os.environ, **env, "POSTROOM_API_URL": api_url, "POSTROOM_API_KEY": key},
        check=True,
        capture_output=True,
        timeout=120,
    )
    expected = _expected(paths["jsonl"])
    assert len(expected) == DOCS
    assert sum(1 for row in expected if row[6] is not None) == len(range(0, DOCS, 17))
    # A cascade's first answers and escalation errors are columns of their own.
    escalated = [n for n in range(DOCS) if n % 13 == 0 and n % 17]
    assert [row[0] for row in expected if row[7] is not None] == [f"doc-{n}" for n in escalated]
    assert all(row[9] == "gpu" for row in expected if row[7] is not None)
    assert sum(1 for row in expected if row[11] is not None) == sum(
        1 for n in range(DOCS) if n % 19 == 0 and n % 13 and n % 17
    )

    # Then pandas and DuckDB read both files back as the JSONL says, in input order
    csv = pd.read_csv(paths["csv"], dtype={"id": str, "label": str, "error": str})
    assert _rows(csv) == expected
    assert _rows(pd.read_parquet(parquet)) == expected
    for source in (f"read_parquet('{parquet}')", f"read_csv('{paths['csv']}', header=true)"):
        frame = duckdb.sql(f"SELECT * FROM {source}").df()
        assert _rows(frame) == expected, source
    # Written a row group at a time (POSTROOM_RESULTS_PARQUET_ROW_GROUP, 10,000 by default).
    assert pq.ParquetFile(parquet).metadata.num_row_groups == DOCS // 10_000


def test_only_failed_and_unknown_format(big_job: tuple[uuid.UUID, str], api_url: str) -> None:
    job_id, key = big_job
    client = Client(api_url, key)
    failed = list(client.results(str(job_id), only_failed=True, format="csv"))
    assert failed[0] == ",".join(COLUMNS)
    assert len(failed) == 1 + len(range(0, DOCS, 17))
    with pytest.raises(ApiError) as refused:
        list(client.results(str(job_id), format="xlsx"))
    assert refused.value.status == 422
    assert "format" in str(refused.value)


def test_the_reaper_writes_results_parquet_next_to_the_shards(
    big_job: tuple[uuid.UUID, str],
    sessions: sessionmaker[Session],
    storage: Storage,
    settings: Settings,
    tmp_path: Path,
) -> None:
    job_id, _ = big_job
    with sessions() as session:
        assert job_id in unexported_jobs(session=session, limit=100_000)
    export_job_parquet(sessions, storage, job_id=job_id, settings=settings)
    path = tmp_path / "exported.parquet"
    path.write_bytes(storage.get_bytes(results_parquet_key(job_id)))
    frame = pd.read_parquet(path)
    assert len(frame) == DOCS
    assert frame["id"].iloc[0] == "doc-0"
    assert frame["error"].notna().sum() == len(range(0, DOCS, 17))
    with sessions() as session:
        exported = session.execute(select(Job.results_exported_at).where(Job.id == job_id))
        assert exported.scalar_one() is not None
        assert job_id not in unexported_jobs(session=session, limit=100_000)


def test_the_drop_folder_asks_for_parquet_in_job_json(
    sessions: sessionmaker[Session], storage: Storage, settings: Settings, tmp_path: Path
) -> None:
    job_file = parse_job_file(
        json.dumps({"labels": ["a", "b"], "results_format": "parquet"}).encode(), where="job.json"
    )
    assert job_file.results_format == "parquet"
    with pytest.raises(UnusableObject, match="results_format"):
        parse_job_file(b'{"labels": ["a", "b"], "results_format": "xml"}', where="job.json")
    # The outbox file of a finished job, as finalize writes it for "results_format": "parquet".
    job_id = finished_job(sessions, tenant=f"drop-{uuid.uuid4().hex[:8]}", docs=300)
    deps = InboxDeps(settings, sessions, storage, None)  # type: ignore[arg-type] # no broker here
    key = outbox_parquet_key("", "tickets", "march.jsonl")
    assert upload_parquet(deps, storage.bucket, key, job_id=job_id) == 300
    path = tmp_path / "outbox.parquet"
    path.write_bytes(storage.get_bytes(key))
    frame = pd.read_parquet(path)
    assert list(frame.columns) == COLUMNS
    assert frame["id"].tolist() == [f"doc-{n}" for n in range(300)]


def test_lines_skipped_at_submission_are_failed_rows_in_every_format(
    sessions: sessionmaker[Session], api_url: str
) -> None:
    tenant = f"skip-{uuid.uuid4().hex[:8]}"
    client = Client(api_url, new_key(sessions, tenant=tenant))
    bad = Rejected(line=2, id=None, field="text", reason="empty", result_id="line-2")
    job_id = make_job(sessions, sizes=(3,), rejected=(bad,), tenant=tenant)
    rows = list(client.results(str(job_id), format="csv"))
    assert rows[0] == ",".join(COLUMNS)
    # (five empty cascade columns, then the two labels' empty probabilities)
    assert rows[1] == (
        'line-2,,,,tiny,tiny-seed0,"invalid_document: line 2, field text: empty",,,,,,,'
    )
    with sessions.begin() as session:  # nothing left running for later tests
        session.execute(update(Job).where(Job.id == job_id).values(status="cancelled"))
