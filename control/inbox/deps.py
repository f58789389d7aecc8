"""What the drop folder works with, built once per process: `postroom beat`'s Control, an event
consumer (`default_deps`), or a test."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from sqlalchemy.orm import Session, sessionmaker

from postroom.db.session import make_engine, make_sessionmaker
from postroom.queue import Celery, make_celery
from postroom.settings import Settings, get_settings
from postroom.storage import Storage


@dataclass
class InboxDeps:
    """Settings, sessions, S3 and the Celery app (to publish) of the drop folder."""

    settings: Settings
    sessions: sessionmaker[Session]
    storage: Storage
    celery: Celery

    @property
    def bucket(self) -> str:
        return self.settings.inbox_bucket or self.settings.s3_bucket

    @property
    def prefix(self) -> str:
        return self.settings.inbox_prefix


@functools.cache
def default_deps() -> InboxDeps:
    """Deps from the process's settings, for event consumers that have nothing else."""
    settings = get_settings()
    return InboxDeps(
        settings, make_sessionmaker(make_engine(settings)), Storage(settings), make_celery(settings)
    )
