"""model_pins: a registry alias pinned to the content digest of its model files

Create Date: 2026-12-04
"""

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0015"


def upgrade() -> None:
    op.create_table(
        "model_pins",
        sa.Column("alias", sa.String(200), nullable=False),
        sa.Column("digest", sa.String(80), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column(
            "pinned_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("alias", name=op.f("pk_model_pins")),
    )


def downgrade() -> None:
    op.drop_table("model_pins")
