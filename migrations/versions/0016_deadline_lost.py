"""jobs.deadline_lost: the router's verdict that a job misses its deadline on every route, so the
claim policy runs it after the jobs that can still meet theirs (triage under overload)

Create Date: 2026-12-05
"""

import sqlalchemy as sa
from alembic import op

revision: str = "0016"
down_revision: str | None = "0013"


def upgrade() -> None:
    op.add_column(
        "jobs",
        sa.Column("deadline_lost", sa.Boolean(), nullable=False, server_default=sa.false()),
    )


def downgrade() -> None:
    op.drop_column("jobs", "deadline_lost")
