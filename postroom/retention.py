"""Retention: which finished jobs are past their time. A job's `expires_after` (seconds), else
POSTROOM_RETENTION_DAYS (0 keeps jobs forever), counts from when it finished; the beat marks those
jobs deleted, a bounded batch per tick,
and purges them through the same path as DELETE /v1/jobs/{id} (postroom.deletion)."""

from __future__ import annotations

import logging

from sqlalchemy import and_, func, or_, select, text, update
from sqlalchemy.orm import Session

from postroom.db.models import Job
from postroom.domain import JOB_ACTIVE
from postroom.settings import Settings

logger = logging.getLogger(__name__)


def expired_jobs_query(*, settings: Settings, limit: int) -> object:
    """Finished, not yet deleted jobs past their retention, oldest first; rows locked with SKIP
    LOCKED so two beats never wait on each other."""
    own = and_(
        Job.expires_after.is_not(None),
        Job.finished_at < func.now() - Job.expires_after * text("interval '1 second'"),
    )
    default = and_(
        Job.expires_after.is_(None),
        Job.finished_at < func.now() - text(f"interval '{settings.retention_days} days'"),
    )
    return (
        select(Job.id)
        .where(
            Job.deleted_at.is_(None),
            Job.finished_at.is_not(None),
            Job.status.not_in(JOB_ACTIVE),
            or_(own, default) if settings.retention_days > 0 else own,
        )
        .order_by(Job.finished_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )


def mark_expired_jobs(*, session: Session, settings: Settings, limit: int) -> int:
    """Mark up to `limit` jobs past retention deleted; returns how many."""
    ids = list(session.scalars(expired_jobs_query(settings=settings, limit=limit)))  # type: ignore[call-overload]
    if ids:
        session.execute(update(Job).where(Job.id.in_(ids)).values(deleted_at=func.now()))
        logger.info("retention: %d finished jobs are past their time", len(ids))
    return len(ids)
