"""Engines and sessionmakers. Nothing else in Postroom creates a database engine."""

from __future__ import annotations

import psycopg
from psycopg import sql
from sqlalchemy import Engine, create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from postroom.settings import Settings


def make_engine(settings: Settings) -> Engine:
    return create_engine(
        settings.database_url,
        pool_size=settings.database_pool_size,
        pool_pre_ping=True,
        connect_args={
            "connect_timeout": 10,
            "options": f"-c statement_timeout={settings.database_statement_timeout_ms}",
        },
    )


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def ensure_database(database_url: str) -> bool:
    """Create the database named in the URL when it does not exist. Returns True if created."""
    url = make_url(database_url)
    name = url.database
    if not name:
        raise ValueError("POSTROOM_DATABASE_URL names no database")
    conninfo = url.set(drivername="postgresql", database="postgres").render_as_string(
        hide_password=False
    )
    with psycopg.connect(conninfo, autocommit=True, connect_timeout=10) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if exists:
            return False
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return True
