"""Per-document results: the public line shape, upserts keyed (job_id, doc_id), streaming reads."""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any

from psycopg.types.json import Jsonb
from sqlalchemy import ColumnElement, func, select, text
from sqlalchemy.orm import Session

from postroom.db.models import Job, Result
from postroom.domain import DocResult, FirstAnswer
from postroom.partitions import insert_routed, results_part

UPSERT_BATCH = 1000


def result_line(result: DocResult, *, route: str, model: str, revision: str) -> dict[str, Any]:
    """The line written to S3 and streamed by the API.

    `{id, label, confidence, route, model, error}` plus the revision, the distribution and whether
    the text was truncated.
    """
    line: dict[str, Any] = {
        "id": result.id,
        "label": result.label,
        "confidence": result.confidence,
        "route": result.route or route,
        "model": result.model or model,
        "revision": result.revision if result.revision is not None else revision,
        "error": result.error,
    }
    if result.distribution is not None:
        line["distribution"] = result.distribution
    if result.truncated:
        line["truncated"] = True
    add_cascade(line, result.first, result.escalation_error)
    return line


def add_cascade(
    line: dict[str, Any], first: FirstAnswer | None, escalation_error: str | None
) -> None:
    """A cascaded document's extra fields: `first` (the first route's answer, when the
    frontier's replaced it) and `escalation_error` (when the first answer stands)."""
    if first is not None:
        line["first"] = first.model_dump()
    if escalation_error is not None:
        line["escalation_error"] = escalation_error


def _first(
    label: str | None, confidence: float | None, route: str | None, model: str | None
) -> FirstAnswer | None:
    if route is None:
        return None
    return FirstAnswer(label=label, confidence=confidence, route=route, model=model or "")


# A result row's own columns, with their Postgres types: one array each in the upsert below.
_PER_ROW = (
    ("doc_id", "text"),
    ("line", "int4"),
    ("label", "text"),
    ("confidence", "float8"),
    ("distribution", "jsonb"),
    ("route", "text"),
    ("model", "text"),
    ("revision", "text"),
    ("error", "text"),
    ("truncated", "bool"),
    ("tokens_in", "int4"),
    ("tokens_out", "int4"),
    ("first_label", "text"),
    ("first_confidence", "float8"),
    ("first_route", "text"),
    ("first_model", "text"),
    ("escalation_error", "text"),
)
_SHARED_COLUMNS = ("job_id", "job_created_at", "part", "shard_no", "attempt")
_REWRITTEN = [c for c, _ in _PER_ROW if c != "doc_id"] + ["shard_no", "attempt", "updated_at"]
# One statement and one round trip for a whole batch: the rows travel as one array per column
# and unnest() turns them back into rows. An executemany would send a statement per row, and
# every round trip gives up the GIL, which a worker's busy classify threads then hold for a
# switch interval each time (bench/commit.py --busy: 4-7x the commit's wall time).
_UPSERT = text(
    f"INSERT INTO results ({', '.join(_SHARED_COLUMNS + tuple(c for c, _ in _PER_ROW))}) "
    f"SELECT {', '.join(':' + c for c in _SHARED_COLUMNS)}, u.* FROM unnest("
    + ", ".join(f"CAST(:{c} AS {t}[])" for c, t in _PER_ROW)
    + ") AS u ON CONFLICT (job_id, doc_id, job_created_at, part) DO UPDATE SET "
    + ", ".join(f"{c} = EXCLUDED.{c}" for c in _REWRITTEN)
)


def upsert_results(
    *,
    session: Session,
    job_id: uuid.UUID,
    shard_no: int,
    attempt: int,
    route: str,
    model: str,
    revision: str,
    results: Sequence[tuple[int, DocResult]],
    job_created_at: datetime,
    part: uuid.UUID,
) -> None:
    """Write (line, result) pairs; a rerun rewrites the same rows, never adds new ones.
    `job_created_at` (the job's created_at) and `part` (its WorkOrder's) pick the rows'
    partition, made here if it is missing."""
    shared = {
        "job_id": job_id,
        "job_created_at": job_created_at,
        "part": part,
        "shard_no": shard_no,
        "attempt": attempt,
    }
    batches = [
        {**shared, **_columns(results[start : start + UPSERT_BATCH], route, model, revision)}
        for start in range(0, len(results), UPSERT_BATCH)
    ]

    def write() -> None:
        for params in batches:
            session.execute(_UPSERT, params)

    insert_routed(session, write, job_id=job_id, job_created_at=job_created_at, part=part)


def _columns(
    results: Sequence[tuple[int, DocResult]], route: str, model: str, revision: str
) -> dict[str, list[Any]]:
    """The rows as one list per column of `_PER_ROW`, a result's own route, model and revision
    (a cascade's frontier answer) over the shard's."""
    columns: dict[str, list[Any]] = {c: [] for c, _ in _PER_ROW}
    for line, r in results:
        first = r.first
        for name, value in (
            ("doc_id", r.id),
            ("line", line),
            ("label", r.label),
            ("confidence", r.confidence),
            ("distribution", None if r.distribution is None else Jsonb(r.distribution)),
            ("route", r.route or route),
            ("model", r.model or model),
            ("revision", r.revision if r.revision is not None else revision),
            ("error", r.error),
            ("truncated", r.truncated),
            ("tokens_in", r.tokens_in),
            ("tokens_out", r.tokens_out),
            ("first_label", first.label if first else None),
            ("first_confidence", first.confidence if first else None),
            ("first_route", first.route if first else None),
            ("first_model", first.model if first else None),
            ("escalation_error", r.escalation_error),
        ):
            columns[name].append(value)
    return columns


def of_job(*, session: Session, job_id: uuid.UUID) -> list[ColumnElement[bool]]:
    """The conditions that pick a job's result rows, its partition keys among them, so a read
    touches only the job's partition (a job with a partition of its own among many)."""
    row = session.execute(select(Job.created_at, Job.own_partition).where(Job.id == job_id)).first()
    if row is None:
        return [Result.job_id == job_id]
    return [
        Result.job_id == job_id,
        Result.job_created_at == row.created_at,
        Result.part == results_part(job_id, own_partition=row.own_partition),
    ]


def iter_result_lines(
    *, session: Session, job_id: uuid.UUID, only_failed: bool = False, chunk: int = 2000
) -> Iterator[dict[str, Any]]:
    """Every result of a job in input order (its line in what the user sent, whatever shard it
    ended in after a split), read with a server-side cursor."""
    query = (
        select(
            Result.doc_id,
            Result.label,
            Result.confidence,
            Result.route,
            Result.model,
            Result.revision,
            Result.error,
            Result.distribution,
            Result.truncated,
            Result.first_label,
            Result.first_confidence,
            Result.first_route,
            Result.first_model,
            Result.escalation_error,
        )
        .where(*of_job(session=session, job_id=job_id))
        .order_by(Result.line)
        .execution_options(yield_per=chunk)
    )
    if only_failed:
        query = query.where(Result.error.is_not(None))
    # Plain rows, not ORM objects: a million-line stream spends its time here.
    for (
        doc_id,
        label,
        confidence,
        route,
        model,
        revision,
        error,
        distribution,
        truncated,
        first_label,
        first_confidence,
        first_route,
        first_model,
        escalation_error,
    ) in session.execute(query):
        line: dict[str, Any] = {
            "id": doc_id,
            "label": label,
            "confidence": confidence,
            "route": route,
            "model": model,
            "revision": revision,
            "error": error,
        }
        if distribution is not None:
            line["distribution"] = distribution
        if truncated:
            line["truncated"] = True
        add_cascade(
            line,
            _first(first_label, first_confidence, first_route, first_model),
            escalation_error,
        )
        yield line


def count_results(*, session: Session, job_id: uuid.UUID) -> int:
    return int(
        session.execute(
            select(func.count()).select_from(Result).where(*of_job(session=session, job_id=job_id))
        ).scalar_one()
    )


def shard_result_lines(
    *, session: Session, job_id: uuid.UUID, shard_no: int, labels: Sequence[str]
) -> list[dict[str, Any]]:
    """A shard's committed results as the lines of its S3 object (distribution in label order,
    as the worker writes it; JSONB does not keep key order)."""
    rows = session.scalars(
        select(Result)
        .where(*of_job(session=session, job_id=job_id), Result.shard_no == shard_no)
        .order_by(Result.line)
    )
    lines = []
    for row in rows:
        result = DocResult(
            id=row.doc_id,
            label=row.label,
            confidence=row.confidence,
            distribution=(
                {name: row.distribution[name] for name in labels if name in row.distribution}
                if row.distribution is not None
                else None
            ),
            error=row.error,
            truncated=row.truncated,
            first=_first(row.first_label, row.first_confidence, row.first_route, row.first_model),
            escalation_error=row.escalation_error,
        )
        lines.append(
            result_line(
                result, route=row.route or "", model=row.model or "", revision=row.revision or ""
            )
        )
    return lines
