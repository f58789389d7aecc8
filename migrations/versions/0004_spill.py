"""spill: per-shard token counts, a job's spill budget, estimate and router note

Create Date: 2026-11-24
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0004"
down_revision: str | None = "0003"


def upgrade() -> None:
    op.add_column(
        "shards", sa.Column("tokens_in", sa.BigInteger(), nullable=False, server_default="0")
    )
    op.add_column(
        "shards", sa.Column("tokens_out", sa.BigInteger(), nullable=False, server_default="0")
    )
    op.add_column("jobs", sa.Column("max_spill_cost", sa.Float(), nullable=True))
    op.add_column(
        "jobs", sa.Column("estimate", postgresql.JSONB(astext_type=sa.Text()), nullable=True)
    )
    op.add_column("jobs", sa.Column("router_note", sa.Text(), nullable=True))


def downgrade() -> None:
    op.drop_column("jobs", "router_note")
    op.drop_column("jobs", "estimate")
    op.drop_column("jobs", "max_spill_cost")
    op.drop_column("shards", "tokens_out")
    op.drop_column("shards", "tokens_in")
