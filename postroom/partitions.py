"""The results table's partitions: one per UTC day of job creation (`results_pYYYYMMDD`, range on
`results.job_created_at`). The migration and the beat create the coming DAYS_AHEAD days'
partitions ahead of time (there is no default partition: it would forbid detaching CONCURRENTLY),
and retention drops a whole day's partition once every job created that day is past its time,
instead of deleting its rows one by one.

DDL on a partitioned table takes a strong lock on it for a moment, so every statement here runs
with a short lock_timeout: a busy table makes it wait for the next tick, never queue writers
behind it.
"""

from __future__ import annotations

import logging
import re
from datetime import UTC, date, datetime, timedelta

from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import DBAPIError

logger = logging.getLogger(__name__)

PARTITION = re.compile(r"^results_p(\d{8})$")
LOCK_TIMEOUT = "2s"
DAYS_AHEAD = 30


def partition_name(day: date) -> str:
    return f"results_p{day:%Y%m%d}"


def create_partition_sql(day: date) -> str:
    """DDL of one day's partition (used by the migration too)."""
    return (
        f"CREATE TABLE IF NOT EXISTS {partition_name(day)} PARTITION OF results "
        f"FOR VALUES FROM ('{day.isoformat()} 00:00:00+00') "
        f"TO ('{(day + timedelta(days=1)).isoformat()} 00:00:00+00')"
    )


def existing_partitions(conn: Connection) -> list[date]:
    names = conn.execute(
        text(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = 'results'::regclass"
        )
    ).scalars()
    days = []
    for name in names:
        found = PARTITION.match(name)
        if found:
            days.append(datetime.strptime(found.group(1), "%Y%m%d").date())
    return sorted(days)


def ensure_partitions(engine: Engine, *, days_ahead: int = DAYS_AHEAD) -> int:
    """Create today's and the next `days_ahead` days' partitions where missing; returns how many
    were created (a busy table leaves the rest to the next call)."""
    today = datetime.now(UTC).date()
    created = 0
    with engine.connect() as conn:
        have = set(existing_partitions(conn))
        for offset in range(days_ahead + 1):
            day = today + timedelta(days=offset)
            if day in have:
                continue
            try:
                with conn.begin():
                    conn.execute(text(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'"))
                    conn.execute(text(create_partition_sql(day)))
                created += 1
            except DBAPIError as e:
                logger.warning("partition %s not created yet: %s", partition_name(day), e)
                break
    return created


def droppable_days(conn: Connection, *, retention_days: int) -> list[date]:
    """Day partitions wholly past retention: every job created that day is finished and past
    POSTROOM_RETENTION_DAYS (and its own expires_after, if any), or already deleted."""
    if retention_days <= 0:
        return []
    cutoff = datetime.now(UTC).date() - timedelta(days=retention_days)
    days = []
    for day in existing_partitions(conn):
        if day + timedelta(days=1) > cutoff:
            break
        blocking = conn.execute(
            text(
                "SELECT 1 FROM jobs WHERE created_at >= :lo AND created_at < :hi "
                "AND deleted_at IS NULL AND (finished_at IS NULL "
                "OR finished_at > now() - make_interval(days => :days) "
                "OR (expires_after IS NOT NULL "
                "AND finished_at > now() - make_interval(secs => expires_after))) LIMIT 1"
            ),
            {"lo": day, "hi": day + timedelta(days=1), "days": retention_days},
        ).first()
        if blocking is None:
            days.append(day)
    return days


def drop_day(engine: Engine, day: date) -> bool:
    """Mark that day's jobs deleted (the purge then removes their objects, shards and rows, with
    no result rows left to delete), then detach the partition CONCURRENTLY (no lock that stops
    writers) and drop it. False when the table was too busy; the next tick tries again."""
    name = partition_name(day)
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE jobs SET deleted_at = now() WHERE created_at >= :lo AND created_at < :hi "
                "AND deleted_at IS NULL"
            ),
            {"lo": day, "hi": day + timedelta(days=1)},
        )
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        try:
            conn.execute(text(f"SET lock_timeout = '{LOCK_TIMEOUT}'"))
            conn.execute(text(f"ALTER TABLE results DETACH PARTITION {name} CONCURRENTLY"))
        except DBAPIError as e:
            if "pending detach" in str(e):  # an earlier detach was interrupted: finish it
                conn.execute(text(f"ALTER TABLE results DETACH PARTITION {name} FINALIZE"))
            elif "is not a partition" not in str(e):  # (not: detached already, drop it)
                logger.warning("partition %s not detached yet: %s", name, e)
                return False
        conn.execute(text(f"DROP TABLE IF EXISTS {name}"))
    logger.info("retention: partition %s dropped", name)
    return True


def drop_partitions_past_retention(engine: Engine, *, retention_days: int) -> int:
    with engine.connect() as conn:
        days = droppable_days(conn, retention_days=retention_days)
    return sum(drop_day(engine, day) for day in days)


def include_name(name: str | None, type_: str, _parent: object) -> bool:
    """Alembic's filter: the day partitions are made at run time, not by the models."""
    return not (type_ == "table" and name is not None and PARTITION.match(name))
