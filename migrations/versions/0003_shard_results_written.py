"""shards.results_written_at (S3 object written after the fenced commit), shards.releases

Create Date: 2026-11-24
"""

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"


def upgrade() -> None:
    op.add_column("shards", sa.Column("results_written_at", sa.DateTime(timezone=True)))
    op.add_column("shards", sa.Column("releases", sa.Integer(), nullable=False, server_default="0"))
    op.create_index(
        "ix_shards_unwritten",
        "shards",
        ["finished_at"],
        postgresql_where=sa.text("state = 'done' AND results_written_at IS NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_shards_unwritten", table_name="shards")
    op.drop_column("shards", "releases")
    op.drop_column("shards", "results_written_at")
