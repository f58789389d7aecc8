"""jobs: results_exported_at (results.parquet written) and deleted_at (deletion under way);
inbox_objects: results_format (the drop folder may ask for Parquet)

A deleted job answers 404 at once; the purge then removes its rows and S3 objects in batches and
the job row last, so a crash midway is resumed by the next DELETE or the beat.

Create Date: 2026-12-04
"""

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"


def upgrade() -> None:
    op.add_column("jobs", sa.Column("results_exported_at", sa.DateTime(timezone=True)))
    op.add_column("jobs", sa.Column("deleted_at", sa.DateTime(timezone=True)))
    op.create_index(
        "ix_jobs_unexported",
        "jobs",
        ["finished_at"],
        postgresql_where=sa.text(
            "status = 'completed' AND results_exported_at IS NULL AND deleted_at IS NULL"
        ),
    )
    op.create_index(
        "ix_jobs_deleted",
        "jobs",
        ["deleted_at"],
        postgresql_where=sa.text("deleted_at IS NOT NULL"),
    )
    op.add_column(
        "inbox_objects",
        sa.Column("results_format", sa.String(8), nullable=False, server_default="jsonl"),
    )


def downgrade() -> None:
    op.drop_column("inbox_objects", "results_format")
    op.drop_index("ix_jobs_deleted", table_name="jobs")
    op.drop_index("ix_jobs_unexported", table_name="jobs")
    op.drop_column("jobs", "deleted_at")
    op.drop_column("jobs", "results_exported_at")
