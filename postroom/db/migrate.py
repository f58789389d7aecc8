"""Run Alembic migrations programmatically (`postroom migrate`, tests, the demo)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

from postroom.db.session import ensure_database

ROOT = Path(__file__).resolve().parents[2]


def alembic_config(database_url: str) -> Config:
    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(ROOT / "migrations"))
    config.attributes["database_url"] = database_url
    return config


def migrate(database_url: str) -> bool:
    """Create the database when missing, then upgrade to head. Returns True if it was created."""
    created = ensure_database(database_url)
    command.upgrade(alembic_config(database_url), "head")
    return created
