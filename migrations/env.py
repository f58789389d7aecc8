"""Alembic environment: URL from Postroom's settings, metadata from postroom.db.models."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool

import postroom.db.batch_models  # noqa: F401
from postroom.db import inbox_models  # noqa: F401
from postroom.db.models import Base
from postroom.partitions import include_name
from postroom.settings import get_settings

target_metadata = Base.metadata


def _url() -> str:
    configured = context.config.attributes.get("database_url")
    return str(configured) if configured else get_settings().database_url


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = create_engine(_url(), poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(
            connection=connection, target_metadata=target_metadata, include_name=include_name
        )
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
