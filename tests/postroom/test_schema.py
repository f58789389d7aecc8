"""The migrated schema is the models' schema, and a job's results stream back in input order."""

from __future__ import annotations

import random
import uuid

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.orm import Session

import postroom.db.batch_models
import postroom.db.inbox_models  # noqa: F401 - registers their tables on Base.metadata
from postroom.db.models import Base, Job, Tenant
from postroom.domain import DocResult
from postroom.partitions import SHARED, include_name
from postroom.results import iter_result_lines, upsert_results


def test_migrations_match_the_models(database_url: str) -> None:
    engine = sa.create_engine(database_url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"include_name": include_name})
            diff = compare_metadata(context, Base.metadata)
    finally:
        engine.dispose()
    assert diff == [], "models and migrations differ; add a migration:\n" + "\n".join(
        map(str, diff)
    )


def test_results_come_back_in_input_order_across_split_shards(database_url: str) -> None:
    engine = sa.create_engine(database_url)
    job_id = uuid.uuid4()
    try:
        with Session(engine) as session, session.begin():
            tenant = Tenant(name=f"order-{job_id}")
            session.add(tenant)
            session.flush()
            session.add(
                Job(
                    id=job_id,
                    tenant_id=tenant.id,
                    status="running",
                    spec={},
                    model="tiny",
                    total_docs=40,
                    shard_count=2,
                )
            )
        with Session(engine) as session:
            created = session.get_one(Job, job_id).created_at
        # Given shard 0 (lines 1-20) was split into shards 2 and 3 while shard 1 (lines 21-40)
        # ran whole, and the parts committed in an arbitrary order
        parts = [(1, range(21, 41)), (3, range(11, 21)), (2, range(1, 11))]
        random.Random(7).shuffle(parts)
        for shard_no, lines in parts:
            with Session(engine) as session, session.begin():
                upsert_results(
                    session=session,
                    job_id=job_id,
                    shard_no=shard_no,
                    results=[(line, DocResult(id=f"doc-{line}", label="a")) for line in lines],
                    route="gpu",
                    model="tiny",
                    revision="r",
                    attempt=1,
                    job_created_at=created,
                    part=SHARED,
                )
        # Then the results read back in the order the documents were sent
        with Session(engine) as session:
            ids = [line["id"] for line in iter_result_lines(session=session, job_id=job_id)]
        assert ids == [f"doc-{line}" for line in range(1, 41)]
    finally:
        engine.dispose()
