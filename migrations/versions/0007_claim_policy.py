"""claim by policy: job priority, tenant weights, priority caps and quotas, and the indexes the
ordering query reads (a job's next claimable shard of a queue; recent work per tenant)

Create Date: 2026-12-04
"""

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"


def upgrade() -> None:
    op.add_column(
        "jobs", sa.Column("priority", sa.String(8), nullable=False, server_default="normal")
    )
    op.add_column("tenants", sa.Column("weight", sa.Float(), nullable=True))
    op.add_column("tenants", sa.Column("max_priority", sa.String(8), nullable=True))
    op.add_column("tenants", sa.Column("quota_docs_waiting", sa.BigInteger(), nullable=True))
    op.add_column("tenants", sa.Column("quota_docs_per_day", sa.BigInteger(), nullable=True))
    op.add_column("tenants", sa.Column("quota_running_shards", sa.Integer(), nullable=True))
    op.create_index(
        "ix_jobs_active",
        "jobs",
        ["created_at"],
        postgresql_where=sa.text("status IN ('validating', 'queued', 'running')"),
    )
    op.create_index(
        "ix_shards_claimable",
        "shards",
        ["job_id", "queue", "shard_no"],
        postgresql_where=sa.text("state IN ('queued', 'expired')"),
    )
    op.create_index(
        "ix_shards_finished",
        "shards",
        ["finished_at"],
        postgresql_where=sa.text("finished_at IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_shards_finished", table_name="shards")
    op.drop_index("ix_shards_claimable", table_name="shards")
    op.drop_index("ix_jobs_active", table_name="jobs")
    for column in (
        "quota_running_shards",
        "quota_docs_per_day",
        "quota_docs_waiting",
        "max_priority",
        "weight",
    ):
        op.drop_column("tenants", column)
    op.drop_column("jobs", "priority")
