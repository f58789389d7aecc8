"""spill_batches: shard attempts sent to a provider's batch endpoint (patient spill)

Create Date: 2026-12-04
"""

import sqlalchemy as sa
from alembic import op

revision: str = "0014"
down_revision: str | None = "0010"


def upgrade() -> None:
    op.create_table(
        "spill_batches",
        sa.Column("job_id", sa.Uuid(), nullable=False),
        sa.Column("shard_no", sa.Integer(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("remote_batch_id", sa.String(200)),
        sa.Column("input_file_id", sa.String(200)),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("note", sa.Text()),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name="fk_spill_batches_job_id_jobs", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("job_id", "shard_no", "attempt", name="pk_spill_batches"),
    )
    op.create_index(
        "ix_spill_batches_open",
        "spill_batches",
        ["state"],
        postgresql_where=sa.text("state = 'submitted'"),
    )


def downgrade() -> None:
    op.drop_table("spill_batches")
