"""cascade: the first answer and escalation error on results; escalation counts on shards

Adding nullable columns to the partitioned results table adds them to every partition without
rewriting rows.

Create Date: 2026-12-04
"""

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0011"

SHARD_COUNTS = ("cascade_docs", "cascade_failed", "cascade_agreed", "cascade_capped")
SHARD_TOKENS = ("cascade_tokens_in", "cascade_tokens_out")


def upgrade() -> None:
    op.add_column("results", sa.Column("first_label", sa.Text(), nullable=True))
    op.add_column("results", sa.Column("first_confidence", sa.Float(), nullable=True))
    op.add_column("results", sa.Column("first_route", sa.String(8), nullable=True))
    op.add_column("results", sa.Column("first_model", sa.String(100), nullable=True))
    op.add_column("results", sa.Column("escalation_error", sa.Text(), nullable=True))
    for name in SHARD_COUNTS:
        op.add_column("shards", sa.Column(name, sa.Integer(), nullable=False, server_default="0"))
    for name in SHARD_TOKENS:
        op.add_column(
            "shards", sa.Column(name, sa.BigInteger(), nullable=False, server_default="0")
        )


def downgrade() -> None:
    for name in (*SHARD_COUNTS, *SHARD_TOKENS):
        op.drop_column("shards", name)
    for name in ("first_label", "first_confidence", "first_route", "first_model"):
        op.drop_column("results", name)
    op.drop_column("results", "escalation_error")
