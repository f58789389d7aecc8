"""results: partitioned by the job's creation day (range on the new job_created_at, which joins
the primary key), so retention drops a day's partition instead of deleting its rows

The existing rows are copied into the new table (with their job's created_at), and partitions
are created for every day that has jobs and for the next 30 days; `postroom beat` keeps
creating them ahead (postroom.partitions).

Create Date: 2026-12-04
"""

from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from alembic import op

from postroom.partitions import DAYS_AHEAD, create_partition_sql

revision: str = "0010"
down_revision: str | None = "0009"

COLUMNS = (
    "job_id, doc_id, shard_no, line, label, confidence, distribution, route, model, revision, "
    "error, truncated, tokens_in, tokens_out, attempt, updated_at"
)


def upgrade() -> None:
    op.execute("ALTER TABLE results RENAME TO results_unpartitioned")
    op.execute("ALTER INDEX pk_results RENAME TO pk_results_unpartitioned")
    op.execute("ALTER INDEX ix_results_job_order RENAME TO ix_results_unpartitioned_order")
    op.execute("ALTER INDEX ix_results_job_line RENAME TO ix_results_unpartitioned_line")
    op.execute(
        "ALTER TABLE results_unpartitioned RENAME CONSTRAINT fk_results_job_id_jobs "
        "TO fk_results_unpartitioned_job"
    )
    op.execute(
        """
        CREATE TABLE results (
            job_id UUID NOT NULL,
            doc_id VARCHAR(512) NOT NULL,
            job_created_at TIMESTAMP WITH TIME ZONE NOT NULL,
            shard_no INTEGER NOT NULL,
            line INTEGER NOT NULL,
            label TEXT,
            confidence FLOAT,
            distribution JSONB,
            route VARCHAR(8),
            model VARCHAR(100),
            revision VARCHAR(200),
            error TEXT,
            truncated BOOLEAN NOT NULL,
            tokens_in INTEGER NOT NULL,
            tokens_out INTEGER NOT NULL,
            attempt INTEGER NOT NULL,
            updated_at TIMESTAMP WITH TIME ZONE DEFAULT now() NOT NULL,
            CONSTRAINT pk_results PRIMARY KEY (job_id, doc_id, job_created_at),
            CONSTRAINT fk_results_job_id_jobs FOREIGN KEY (job_id)
                REFERENCES jobs (id) ON DELETE CASCADE
        ) PARTITION BY RANGE (job_created_at)
        """
    )
    op.create_index("ix_results_job_order", "results", ["job_id", "shard_no", "line"])
    op.create_index("ix_results_job_line", "results", ["job_id", "line"])
    bind = op.get_bind()
    days = {
        row[0]
        for row in bind.execute(
            sa.text("SELECT DISTINCT (created_at AT TIME ZONE 'UTC')::date FROM jobs")
        )
    }
    today = datetime.now(UTC).date()
    days |= {today + timedelta(days=n) for n in range(DAYS_AHEAD + 1)}
    for day in sorted(days):
        op.execute(create_partition_sql(day))
    op.execute(
        f"INSERT INTO results ({COLUMNS}, job_created_at) "
        f"SELECT {', '.join('r.' + c.strip() for c in COLUMNS.split(','))}, j.created_at "
        "FROM results_unpartitioned r JOIN jobs j ON j.id = r.job_id"
    )
    op.execute("DROP TABLE results_unpartitioned")


def downgrade() -> None:
    op.execute("ALTER TABLE results RENAME TO results_partitioned")
    op.execute("ALTER INDEX pk_results RENAME TO pk_results_partitioned")
    op.execute("ALTER INDEX ix_results_job_order RENAME TO ix_results_partitioned_order")
    op.execute("ALTER INDEX ix_results_job_line RENAME TO ix_results_partitioned_line")
    op.execute(
        "ALTER TABLE results_partitioned RENAME CONSTRAINT fk_results_job_id_jobs "
        "TO fk_results_partitioned_job"
    )
    op.execute(
        f"""
        CREATE TABLE results AS SELECT {COLUMNS} FROM results_partitioned WITH NO DATA;
        ALTER TABLE results ADD CONSTRAINT pk_results PRIMARY KEY (job_id, doc_id);
        ALTER TABLE results ADD CONSTRAINT fk_results_job_id_jobs FOREIGN KEY (job_id)
            REFERENCES jobs (id) ON DELETE CASCADE;
        ALTER TABLE results ALTER COLUMN updated_at SET DEFAULT now();
        CREATE INDEX ix_results_job_order ON results (job_id, shard_no, line);
        CREATE INDEX ix_results_job_line ON results (job_id, line);
        INSERT INTO results SELECT {COLUMNS} FROM results_partitioned;
        DROP TABLE results_partitioned CASCADE;
        """
    )
