"""results: each day's partition split by LIST on a new `part` column (NIL for most jobs, the
job's id for a job of its own partition, `jobs.own_partition`), so deleting a big job drops its
partition instead of deleting its rows; the foreign key from results to jobs goes.

The key goes because with a partition per big job its ON DELETE CASCADE would probe (and lock)
every partition each time a job row is deleted; the purge deletes a job's rows, or drops its
partition, before the job row (postroom.deletion), and retention drops whole days.

Day partitions that hold rows stay as they are (plain tables: their jobs' rows are deleted row by
row); the empty ones made ahead of time are made again split by `part` (postroom.partitions).

Create Date: 2026-12-04
"""

from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from alembic import op

from postroom.partitions import DAYS_AHEAD, SHARED, day_partition_sql

revision: str = "0015"
down_revision: str | None = "0014"


def _days(bind: sa.Connection) -> dict[str, str]:
    """Day partitions of results: name -> relkind ('r' plain, 'p' split)."""
    rows = bind.execute(
        sa.text(
            "SELECT c.relname, c.relkind FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = 'results'::regclass"
        )
    )
    return {str(name): str(kind) for name, kind in rows}


def upgrade() -> None:
    op.add_column(
        "jobs",
        sa.Column("own_partition", sa.Boolean(), nullable=False, server_default=sa.false()),
    )
    op.execute(f"ALTER TABLE results ADD COLUMN part UUID NOT NULL DEFAULT '{SHARED}'")
    op.execute("ALTER TABLE results DROP CONSTRAINT fk_results_job_id_jobs")
    op.execute("ALTER TABLE results DROP CONSTRAINT pk_results")
    op.execute(
        "ALTER TABLE results ADD CONSTRAINT pk_results "
        "PRIMARY KEY (job_id, doc_id, job_created_at, part)"
    )
    bind = op.get_bind()
    for name, kind in _days(bind).items():
        empty = bind.execute(sa.text(f"SELECT NOT EXISTS (SELECT 1 FROM {name})")).scalar_one()
        if kind == "r" and empty:
            op.execute(f"DROP TABLE {name}")
    have = set(_days(bind))
    today = datetime.now(UTC).date()
    for day in (today + timedelta(days=n) for n in range(DAYS_AHEAD + 1)):
        if f"results_p{day:%Y%m%d}" not in have:
            for statement in day_partition_sql(day):
                op.execute(statement)


def downgrade() -> None:
    # Split days become plain tables again (their rows copied), then the column and key go back.
    bind = op.get_bind()
    for name, kind in _days(bind).items():
        if kind != "p":
            continue
        bounds = bind.execute(
            sa.text("SELECT pg_get_expr(relpartbound, oid) FROM pg_class WHERE relname = :n"),
            {"n": name},
        ).scalar_one()
        op.execute(f"ALTER TABLE results DETACH PARTITION {name}")
        op.execute(f"ALTER TABLE {name} RENAME TO {name}_split")
        op.execute(f"CREATE TABLE {name} (LIKE results INCLUDING DEFAULTS)")
        op.execute(f"INSERT INTO {name} SELECT * FROM {name}_split")
        op.execute(f"DROP TABLE {name}_split")
        op.execute(f"ALTER TABLE results ATTACH PARTITION {name} {bounds}")
    op.execute("ALTER TABLE results DROP CONSTRAINT pk_results")
    op.execute("ALTER TABLE results DROP COLUMN part")
    op.execute(
        "ALTER TABLE results ADD CONSTRAINT pk_results PRIMARY KEY (job_id, doc_id, job_created_at)"
    )
    op.execute(
        "ALTER TABLE results ADD CONSTRAINT fk_results_job_id_jobs FOREIGN KEY (job_id) "
        "REFERENCES jobs (id) ON DELETE CASCADE"
    )
    op.drop_column("jobs", "own_partition")
