"""The results upsert (one statement a batch, the rows as arrays through unnest()): every column
arrives as written, a rerun rewrites the same rows, and a shard over one batch writes them all."""

from __future__ import annotations

import uuid

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from postroom.db.models import Job, Result
from postroom.domain import DocResult, FirstAnswer
from postroom.partitions import SHARED
from postroom.results import UPSERT_BATCH, upsert_results
from tests.postroom.jobrows import make_job

MIXED = [
    (
        1,
        DocResult(
            id="plain",
            label="a",
            confidence=0.75,
            distribution={"a": 0.75, "b": 0.25},
            tokens_in=120,
            tokens_out=1,
        ),
    ),
    (2, DocResult(id="failed", error="engine_error: boom", truncated=True)),
    (
        3,
        DocResult(
            id="escalated",
            label="b",
            confidence=0.9,
            first=FirstAnswer(label="a", confidence=0.4, route="gpu", model="tiny"),
            route="spill",
            model="frontier",
            revision="",
        ),
    ),
    (4, DocResult(id="kept", label="a", confidence=0.4, escalation_error="spill: timeout")),
]


def write(
    sessions: sessionmaker[Session],
    job_id: uuid.UUID,
    results: list[tuple[int, DocResult]],
    *,
    attempt: int,
) -> None:
    with sessions.begin() as session:
        created = session.execute(sa.select(Job.created_at).where(Job.id == job_id)).scalar_one()
        upsert_results(
            session=session,
            job_id=job_id,
            shard_no=0,
            attempt=attempt,
            route="gpu",
            model="tiny",
            revision="tiny-seed0",
            results=results,
            job_created_at=created,
            part=SHARED,
        )


def rows(sessions: sessionmaker[Session], job_id: uuid.UUID) -> dict[str, Result]:
    with sessions() as session:
        found = session.scalars(sa.select(Result).where(Result.job_id == job_id)).all()
        session.expunge_all()
    return {r.doc_id: r for r in found}


def test_every_column_arrives_and_a_rerun_rewrites_the_same_rows(
    sessions: sessionmaker[Session],
) -> None:
    job_id = make_job(sessions, sizes=(4,))
    write(sessions, job_id, MIXED, attempt=1)
    got = rows(sessions, job_id)
    assert set(got) == {"plain", "failed", "escalated", "kept"}
    plain = got["plain"]
    assert (plain.line, plain.label, plain.confidence) == (1, "a", 0.75)
    assert plain.distribution == {"a": 0.75, "b": 0.25}
    assert (plain.route, plain.model, plain.revision) == ("gpu", "tiny", "tiny-seed0")
    assert (plain.tokens_in, plain.tokens_out, plain.attempt, plain.shard_no) == (120, 1, 1, 0)
    failed = got["failed"]
    assert (failed.label, failed.distribution, failed.error) == (None, None, "engine_error: boom")
    assert failed.truncated is True
    escalated = got["escalated"]
    # The frontier's own route, model and revision (an empty revision is kept, not replaced).
    assert (escalated.route, escalated.model, escalated.revision) == ("spill", "frontier", "")
    first = (escalated.first_label, escalated.first_confidence, escalated.first_route)
    assert (*first, escalated.first_model) == ("a", 0.4, "gpu", "tiny")
    assert got["kept"].escalation_error == "spill: timeout"
    assert got["kept"].first_route is None

    # A second attempt of the same shard: the same rows, rewritten.
    again = [(line, r.model_copy(update={"label": "b", "error": None})) for line, r in MIXED]
    write(sessions, job_id, again, attempt=2)
    got = rows(sessions, job_id)
    assert len(got) == 4
    assert {r.label for r in got.values()} == {"b"}
    assert {r.attempt for r in got.values()} == {2}
    assert got["failed"].error is None


def test_a_shard_over_one_batch_writes_every_row(sessions: sessionmaker[Session]) -> None:
    count = UPSERT_BATCH * 2 + 3
    job_id = make_job(sessions, sizes=(count,))
    write(
        sessions,
        job_id,
        [(n, DocResult(id=f"d{n}", label="a")) for n in range(count)],
        attempt=1,
    )
    got = rows(sessions, job_id)
    assert len(got) == count
    assert sorted(r.line for r in got.values()) == list(range(count))


def test_an_empty_shard_writes_nothing(sessions: sessionmaker[Session]) -> None:
    job_id = make_job(sessions, sizes=(1,))
    write(sessions, job_id, [], attempt=1)
    assert rows(sessions, job_id) == {}
