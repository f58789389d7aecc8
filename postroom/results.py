"""Per-document results: the public line shape, upserts keyed (job_id, doc_id), streaming reads."""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, func, select
from sqlalchemy.dialects.postgresql import insert
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
    stmt = insert(Result)
    stmt = stmt.on_conflict_do_update(
        index_elements=[Result.job_id, Result.doc_id, Result.job_created_at, Result.part],
        set_={
            col: stmt.excluded[col]
            for col in (
                "shard_no",
                "line",
                "label",
                "confidence",
                "distribution",
                "route",
                "model",
                "revision",
                "error",
                "truncated",
                "tokens_in",
                "tokens_out",
                "attempt",
                "updated_at",
                "first_label",
                "first_confidence",
                "first_route",
                "first_model",
                "escalation_error",
            )
        },
    )
    rows = [
        {
            "job_id": job_id,
            "doc_id": r.id,
            "job_created_at": job_created_at,
            "part": part,
            "shard_no": shard_no,
            "line": line,
            "label": r.label,
            "confidence": r.confidence,
            "distribution": r.distribution,
            "route": r.route or route,
            "model": r.model or model,
            "revision": r.revision if r.revision is not None else revision,
            "error": r.error,
            "truncated": r.truncated,
            "tokens_in": r.tokens_in,
            "tokens_out": r.tokens_out,
            "attempt": attempt,
            "first_label": r.first.label if r.first else None,
            "first_confidence": r.first.confidence if r.first else None,
            "first_route": r.first.route if r.first else None,
            "first_model": r.first.model if r.first else None,
            "escalation_error": r.escalation_error,
        }
        for line, r in results
    ]
    insert_routed(
        session,
        stmt,
        rows,
        job_id=job_id,
        job_created_at=job_created_at,
        part=part,
        batch=UPSERT_BATCH,
    )


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
