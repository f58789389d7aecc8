"""results: an index on (job_id, line), so results stream back in input order

A split shard's parts get new shard numbers after the last one, so (shard_no, line) put their
documents at the end; `line` is the document's line (or list index + 1) in what the user sent.

Create Date: 2026-11-24
"""

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"


def upgrade() -> None:
    op.create_index("ix_results_job_line", "results", ["job_id", "line"])


def downgrade() -> None:
    op.drop_index("ix_results_job_line", table_name="results")
