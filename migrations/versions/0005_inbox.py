"""inbox_objects: the S3 drop folder, one row per (bucket, key, ETag)

Create Date: 2026-11-24
"""

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"


def _at(name: str) -> sa.Column[sa.DateTime]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=True)


def _now(name: str) -> sa.Column[sa.DateTime]:
    return sa.Column(
        name, sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
    )


def upgrade() -> None:
    op.create_table(
        "inbox_objects",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("bucket", sa.String(length=255), nullable=False),
        sa.Column("key", sa.String(length=1024), nullable=False),
        sa.Column("etag", sa.String(length=200), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("folder", sa.String(length=1024), nullable=False),
        sa.Column("file", sa.String(length=1024), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("job_id", sa.Uuid(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("attempt", sa.Integer(), nullable=False),
        _at("lease_until"),
        _now("seen_at"),
        _now("updated_at"),
        _at("ingested_at"),
        _at("finished_at"),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_inbox_objects_job_id_jobs"), ondelete="SET NULL"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_inbox_objects")),
        sa.UniqueConstraint("bucket", "key", "etag", name="uq_inbox_objects_bucket_key_etag"),
    )
    op.create_index("ix_inbox_objects_seen_at", "inbox_objects", ["seen_at"], unique=False)
    op.create_index(
        "ix_inbox_objects_state_lease", "inbox_objects", ["state", "lease_until"], unique=False
    )


def downgrade() -> None:
    op.drop_index("ix_inbox_objects_state_lease", table_name="inbox_objects")
    op.drop_index("ix_inbox_objects_seen_at", table_name="inbox_objects")
    op.drop_table("inbox_objects")
