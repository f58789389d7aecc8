"""The results table's partitions: one per UTC day of job creation (`results_pYYYYMMDD`, range
on `results.job_created_at`), each split by LIST on `results.part`: `results_pYYYYMMDD_shared`
holds the jobs with `part` = NIL (most jobs), and a job of at least
POSTROOM_RESULTS_OWN_PARTITION_DOCS documents writes `part` = its id into a partition of its own,
`results_pYYYYMMDD_j<id hex>`. Retention drops a whole day's partition once every job created
that day is past its time; deleting a big job detaches and drops its own partition; neither
deletes rows one by one. Only small jobs' rows are deleted row by row (postroom.deletion).

The beat creates the coming DAYS_AHEAD days' partitions ahead of time; a writer that finds no
partition for its rows (the beat was down for a month, a job's own partition is not made yet)
creates it on demand and writes again (insert_routed). There is no DEFAULT partition: it would
forbid detaching CONCURRENTLY, and creating a day while rows for it sat in the default would have
to move them under a lock that stops writers.

Partitions are made as plain tables (CREATE TABLE … LIKE) and then ATTACHed: ATTACH takes a SHARE
UPDATE EXCLUSIVE lock on the parent, which writers do not wait for (CREATE TABLE … PARTITION OF
would take ACCESS EXCLUSIVE). Detaching is CONCURRENTLY. Every statement runs with a short
lock_timeout: a busy table makes it wait for the next tick, never queue writers behind it.

Day partitions made before migration 0015 (plain tables, not split by `part`) keep working: a big
job's rows then sit in the day's table with the others and are deleted row by row.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta

from sqlalchemy import Connection, Engine, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from postroom.db.models import Job

logger = logging.getLogger(__name__)

PARTITION = re.compile(r"^results_p(\d{8})$")
ANY_PARTITION = re.compile(r"^results_p\d{8}(_shared|_j[0-9a-f]{32})?$")
LOCK_TIMEOUT = "2s"
DAYS_AHEAD = 30
# `results.part` of the jobs that share their day's partition.
SHARED = uuid.UUID(int=0)


def partition_name(day: date) -> str:
    return f"results_p{day:%Y%m%d}"


def create_partition_sql(day: date) -> str:
    """DDL of one day's partition as migration 0010 made them (a plain table); frozen for it."""
    return (
        f"CREATE TABLE IF NOT EXISTS {partition_name(day)} PARTITION OF results "
        f"FOR VALUES FROM ('{day.isoformat()} 00:00:00+00') "
        f"TO ('{(day + timedelta(days=1)).isoformat()} 00:00:00+00')"
    )


def _range(day: date) -> str:
    return (
        f"FROM ('{day.isoformat()} 00:00:00+00') "
        f"TO ('{(day + timedelta(days=1)).isoformat()} 00:00:00+00')"
    )


def job_partition_name(day: date, job_id: uuid.UUID) -> str:
    return f"{partition_name(day)}_j{job_id.hex}"


def day_partition_sql(day: date) -> list[str]:
    """DDL of one day's partition, split by `part`, with its shared partition (the migration
    runs these in its transaction; ensure_day runs them one by one)."""
    name = partition_name(day)
    return [
        f"CREATE TABLE IF NOT EXISTS {name} (LIKE results INCLUDING DEFAULTS) "
        "PARTITION BY LIST (part)",
        f"CREATE TABLE IF NOT EXISTS {name}_shared (LIKE results INCLUDING DEFAULTS)",
        f"ALTER TABLE {name} ATTACH PARTITION {name}_shared FOR VALUES IN ('{SHARED}')",
        f"ALTER TABLE results ATTACH PARTITION {name} FOR VALUES {_range(day)}",
    ]


def _parent(conn: Connection, name: str) -> str | None:
    """The table `name` is a partition of (None: not a partition, or no such table)."""
    return conn.execute(
        text(
            "SELECT p.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "JOIN pg_class p ON p.oid = i.inhparent WHERE c.relname = :name"
        ),
        {"name": name},
    ).scalar_one_or_none()


def _exists(conn: Connection, name: str) -> bool:
    found = conn.execute(text("SELECT to_regclass(:name)"), {"name": name}).scalar_one()
    return found is not None


def _attach(conn: Connection, statement: str) -> None:
    """Run an ATTACH; one that another writer made first is no error."""
    try:
        conn.execute(text(statement))
    except DBAPIError as e:
        if "already a partition" not in str(e):
            raise


def _autocommit(engine: Engine) -> Connection:
    conn = engine.connect().execution_options(isolation_level="AUTOCOMMIT")
    conn.execute(text(f"SET lock_timeout = '{LOCK_TIMEOUT}'"))
    return conn


def ensure_day(engine: Engine, day: date) -> bool:
    """Create that day's partition (and its shared partition) if missing; True when made.

    Raises:
        DBAPIError: the table was too busy (lock_timeout); nothing half-made is left unusable,
            a later call finishes it.
    """
    name = partition_name(day)
    with _autocommit(engine) as conn:
        if _parent(conn, name) == "results":
            return False
        create_day, create_shared, attach_shared, attach_day = day_partition_sql(day)
        conn.execute(text(create_day))
        conn.execute(text(create_shared))
        if _parent(conn, f"{name}_shared") != name:
            _attach(conn, attach_shared)
        _attach(conn, attach_day)
    logger.info("results partition %s created", name)
    return True


def ensure_job_partition(engine: Engine, day: date, job_id: uuid.UUID) -> bool:
    """Create the job's own partition under its day's (made first if missing); True when made.
    False when the day's partition is a plain table (made before migration 0015): the job's rows
    then go there."""
    ensure_day(engine, day)
    name = job_partition_name(day, job_id)
    with _autocommit(engine) as conn:
        if _parent(conn, name) is not None:
            return False
        split = conn.execute(
            text("SELECT relkind = 'p' FROM pg_class WHERE relname = :name"),
            {"name": partition_name(day)},
        ).scalar_one()
        if not split:
            return False
        conn.execute(text(f"CREATE TABLE IF NOT EXISTS {name} (LIKE results INCLUDING DEFAULTS)"))
        _attach(
            conn,
            f"ALTER TABLE {partition_name(day)} ATTACH PARTITION {name} FOR VALUES IN ('{job_id}')",
        )
    logger.info("results partition %s created for job %s", name, job_id)
    return True


def results_part(job_id: uuid.UUID, *, own_partition: bool) -> uuid.UUID:
    """The `part` a job's result rows carry."""
    return job_id if own_partition else SHARED


def insert_routed(
    session: Session,
    write: Callable[[], object],
    *,
    job_id: uuid.UUID,
    job_created_at: datetime,
    part: uuid.UUID,
) -> None:
    """Run `write`, which inserts (or upserts) result rows of one job. When no partition takes
    them (their day's, or the job's own, is not made yet), make it, on a connection of its own
    so no DDL lock joins the caller's transaction, and write them again. A job being deleted
    gets no new partition: the write fails as before."""

    try:
        with session.begin_nested():
            write()
        return
    except DBAPIError as e:
        if "no partition of relation" not in str(e):
            raise
    deleted = session.execute(select(Job.deleted_at).where(Job.id == job_id)).first()
    if deleted is None or deleted.deleted_at is not None:
        raise LookupError(f"job {job_id} is gone or being deleted; its results are not written")
    engine = session.get_bind().engine
    day = job_created_at.astimezone(UTC).date()
    for attempt in range(3):  # two writers making the same table at once: one of them fails
        try:
            if part == SHARED:
                ensure_day(engine, day)
            else:
                ensure_job_partition(engine, day, part)
            break
        except DBAPIError:
            if attempt == 2:
                raise
    write()


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
                created += ensure_day(engine, day)
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


def detach_and_drop(engine: Engine, parent: str, name: str) -> bool:
    """Detach partition `name` from `parent` CONCURRENTLY (no lock that stops writers; it waits
    for the transactions that may still see it) and drop it. False when the table was too busy;
    a later call finishes it (an interrupted detach is finalized)."""
    with _autocommit(engine) as conn:
        try:
            conn.execute(text(f"ALTER TABLE {parent} DETACH PARTITION {name} CONCURRENTLY"))
        except DBAPIError as e:
            if "pending detach" in str(e):  # an earlier detach was interrupted: finish it
                try:
                    conn.execute(text(f"ALTER TABLE {parent} DETACH PARTITION {name} FINALIZE"))
                except DBAPIError as again:
                    logger.warning("partition %s not detached yet: %s", name, again)
                    return False
            elif "is not a partition" not in str(e) and "does not exist" not in str(e):
                logger.warning("partition %s not detached yet: %s", name, e)
                return False
        conn.execute(text(f"DROP TABLE IF EXISTS {name}"))
    return True


def drop_job_partition(engine: Engine, day: date, job_id: uuid.UUID) -> bool | None:
    """Drop the job's own partition, rows and all: None when it has none (its rows, if any, are
    in a shared table), False when the table was too busy this time."""
    name = job_partition_name(day, job_id)
    with engine.connect() as conn:
        if not _exists(conn, name):
            return None
    done = detach_and_drop(engine, partition_name(day), name)
    if done:
        logger.info("partition %s of job %s dropped", name, job_id)
    return done


def drop_day(engine: Engine, day: date) -> bool:
    """Mark that day's jobs deleted (the purge then removes their objects, shards and rows, with
    no result rows left to delete), then detach the partition (with every partition under it)
    CONCURRENTLY and drop it. False when the table was too busy; the next tick tries again."""
    name = partition_name(day)
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE jobs SET deleted_at = now() WHERE created_at >= :lo AND created_at < :hi "
                "AND deleted_at IS NULL"
            ),
            {"lo": day, "hi": day + timedelta(days=1)},
        )
    if not detach_and_drop(engine, "results", name):
        return False
    logger.info("retention: partition %s dropped", name)
    return True


def drop_partitions_past_retention(engine: Engine, *, retention_days: int) -> int:
    with engine.connect() as conn:
        days = droppable_days(conn, retention_days=retention_days)
    return sum(drop_day(engine, day) for day in days)


def include_name(name: str | None, type_: str, _parent: object) -> bool:
    """Alembic's filter: the day partitions are made at run time, not by the models."""
    return not (type_ == "table" and name is not None and ANY_PARTITION.match(name))
