"""The S3 drop folder's rules: which keys are data files, job.json, reasons that say what to fix,
bounded gunzip, and the `inbox_objects` state changes (compare-and-set, the caller commits).

States: `seen` (claimed for ingest, or waiting for job.json or a worker) → `ingested` (the job is
committed) → `running` (its shards are published) → `done` (results in outbox/, input in done/), or
`failed` (the reason says what to fix; the input is in failed/).
"""

from __future__ import annotations

import enum
import json
import uuid
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from pydantic import ValidationError
from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from postroom.db.inbox_models import InboxObject
from postroom.db.models import Job
from postroom.domain import JobStatus
from postroom.errors import InvalidInput
from postroom.keys import drop_area, inbox_object_id
from postroom.settings import Settings
from postroom.submit import JobOptions

JOB_FILE = "job.json"
DATA_SUFFIXES = (".jsonl", ".jsonl.gz")
MAX_JOB_FILE_BYTES = 1024 * 1024
# The gzip ratio check starts past this many decompressed bytes: small files of repetitive text
# may compress very well without being a bomb.
GZIP_RATIO_FLOOR = 64 * 1024 * 1024
GUNZIP_OUT_CHUNK = 1024 * 1024
JOB_FILE_FIELDS = (*JobOptions.model_fields, "tenant")


class InboxState(enum.StrEnum):
    seen = "seen"
    ingested = "ingested"
    running = "running"
    done = "done"
    failed = "failed"


FINISHED_JOB = (JobStatus.completed, JobStatus.failed, JobStatus.cancelled)


class UnusableObject(Exception):
    """The object can never become a job as it is; `reason` says what to fix (failed/)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class NotReady(Exception):
    """The object cannot become a job yet (no job.json, no worker for its model): retry later."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class DropObject:
    """One object version in `<prefix>/inbox/<folder>/<file>`."""

    bucket: str
    key: str
    etag: str
    size: int
    folder: str
    file: str
    last_modified: datetime | None = None

    @property
    def id(self) -> uuid.UUID:
        return inbox_object_id(self.bucket, self.key, self.etag)

    @property
    def gzip(self) -> bool:
        return self.file.endswith(".gz")


def normalize_etag(etag: str) -> str:
    """Listings quote ETags, event notifications do not: store them bare."""
    return etag.removeprefix("W/").strip('"')


def locate(key: str, *, prefix: str) -> tuple[str, str] | None:
    """(folder, file) of a key in the inbox, or None when the key is not a candidate for a job
    (outside the inbox, a console "folder" marker, or a folder's job.json). A file dropped
    straight into inbox/ has folder ""."""
    inbox = drop_area(prefix, "inbox")
    if not key.startswith(inbox) or key.endswith("/"):
        return None
    folder, _, file = key[len(inbox) :].partition("/")
    if not file:  # no folder: the whole rest is the file name
        folder, file = "", folder
    if file == JOB_FILE:
        return None
    return folder, file


def check_data_file(obj: DropObject, *, prefix: str) -> None:
    """Raise UnusableObject for a file that cannot be a job whatever its content."""
    inbox = drop_area(prefix, "inbox")
    if not obj.folder:
        raise UnusableObject(
            f"{obj.file} was dropped straight into {inbox}; put data files in a folder, "
            f"{inbox}<name>/{obj.file}, next to {inbox}<name>/{JOB_FILE} with the labels"
        )
    if not obj.file.endswith(DATA_SUFFIXES):
        raise UnusableObject(
            f"{obj.file} is not a .jsonl or .jsonl.gz file; only those become jobs. Rename it "
            f"(one JSON document per line) and upload it to {inbox}{obj.folder}/ again"
        )


@dataclass(frozen=True)
class JobFile:
    options: JobOptions
    tenant: str | None


def parse_job_file(raw: bytes, *, where: str) -> JobFile:
    """job.json → the job's options and tenant; UnusableObject names every problem."""
    fix = "Fix it, then upload the data files again"
    if len(raw) > MAX_JOB_FILE_BYTES:
        raise UnusableObject(f"{where} is over {MAX_JOB_FILE_BYTES:,} bytes; shorten it. {fix}")
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise UnusableObject(f"{where} is not UTF-8 (byte {e.start}); re-save it. {fix}") from e
    except json.JSONDecodeError as e:
        raise UnusableObject(
            f"{where} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}. {fix}"
        ) from e
    if not isinstance(data, dict):
        raise UnusableObject(
            f'{where} must be a JSON object like {{"labels": ["a", "b"]}}, '
            f"not a {type(data).__name__}. {fix}"
        )
    tenant = data.pop("tenant", None)
    if tenant is not None and (not isinstance(tenant, str) or not 0 < len(tenant.strip()) <= 200):
        raise UnusableObject(f'{where}: "tenant" must be a name of 1 to 200 characters. {fix}')
    try:
        options = JobOptions.model_validate(data)
    except ValidationError as e:
        problems = [
            f"{'.'.join(str(p) for p in err['loc']) or 'job.json'}: {err['msg']}"
            for err in e.errors()[:5]
        ]
        raise UnusableObject(
            f"{where} has invalid options: {'; '.join(problems)}. "
            f"Allowed fields: {', '.join(JOB_FILE_FIELDS)}. {fix}"
        ) from e
    return JobFile(options=options, tenant=tenant.strip() if tenant else None)


def invalid_input_reason(error: InvalidInput, *, fix: str) -> str:
    """An API error as a reason file: the message, the first problems, then what to do."""
    lines = [error.message]
    for detail in error.details[:20]:
        where = f"line {detail['line']}" if "line" in detail else detail.get("field", "")
        lines.append(f"  {where}: {detail.get('reason', '')}".rstrip(": "))
    lines.append(fix)
    return "\n".join(lines)


def waits_for_worker(options: JobOptions, settings: Settings) -> bool:
    """True when the job's model is a valid choice that no worker serves yet (so wait for one),
    False when the choice itself is wrong (an unknown alias, a mode the alias does not do)."""
    if options.model is None:
        return True
    spec = settings.models.get(options.model)
    return spec is not None and (options.mode is None or spec.mode == options.mode)


def gunzip_chunks(
    chunks: Iterable[bytes], *, name: str, max_bytes: int, max_ratio: int
) -> Iterator[bytes]:
    """Decompress a (multi-member) gzip stream chunk by chunk, refusing gzip bombs: more than
    `max_bytes` out, or more than `max_ratio` times the bytes read once past GZIP_RATIO_FLOOR."""
    decompressor = zlib.decompressobj(wbits=zlib.MAX_WBITS | 16)
    read = written = 0
    for chunk in chunks:
        read += len(chunk)
        data = chunk
        while True:
            if decompressor.eof and data:  # the next gzip member starts here
                decompressor = zlib.decompressobj(wbits=zlib.MAX_WBITS | 16)
            try:
                out = decompressor.decompress(data, GUNZIP_OUT_CHUNK)
            except zlib.error as e:
                raise UnusableObject(
                    f"{name} is not a valid gzip file ({e}); upload it uncompressed as .jsonl "
                    "or compress it again with gzip"
                ) from e
            written += len(out)
            if written > max_bytes:
                raise UnusableObject(
                    f"{name} decompresses to more than {max_bytes:,} bytes "
                    "(POSTROOM_INBOX_MAX_DECOMPRESSED_BYTES); split it into smaller files"
                )
            if written > GZIP_RATIO_FLOOR and written > max_ratio * read:
                raise UnusableObject(
                    f"{name} expands more than {max_ratio}x when decompressed "
                    "(POSTROOM_INBOX_MAX_GZIP_RATIO), like a gzip bomb; upload it uncompressed "
                    "as .jsonl or split it"
                )
            if out:
                yield out
            data = decompressor.unused_data if decompressor.eof else decompressor.unconsumed_tail
            # A full output chunk may leave output pending inside zlib: drain it before leaving.
            if not data and (decompressor.eof or len(out) < GUNZIP_OUT_CHUNK):
                break
    if read and not decompressor.eof:
        raise UnusableObject(f"{name} is a truncated gzip file; upload it again")


# -- inbox_objects state changes: compare-and-set on (id, attempt, state); the caller commits


def _lease(seconds: float) -> Any:
    return func.now() + timedelta(seconds=seconds)


def claim_new(*, session: Session, obj: DropObject, lease_seconds: float) -> int | None:
    """Insert the object as `seen` and hold it; None when a row exists already (someone else's).

    `insert … on conflict do nothing`: of two watchers racing on one object version, the second
    waits for the first's commit and then gets nothing.
    """
    stmt = (
        insert(InboxObject)
        .values(
            id=obj.id,
            bucket=obj.bucket,
            key=obj.key,
            etag=obj.etag,
            size=obj.size,
            folder=obj.folder,
            file=obj.file,
            state=InboxState.seen,
            attempt=1,
            lease_until=_lease(lease_seconds),
        )
        .on_conflict_do_nothing()
        .returning(InboxObject.attempt)
    )
    return session.execute(stmt).scalar_one_or_none()


def reclaim(
    *, session: Session, object_id: uuid.UUID, lease_seconds: float, failed_too: bool = False
) -> int | None:
    """Take over a `seen` row whose lease ran out (its ingester died, or it was waiting), and with
    `failed_too` a failed row that never became a job (its object is back in the inbox)."""
    stale = and_(
        InboxObject.state == InboxState.seen,
        or_(InboxObject.lease_until.is_(None), InboxObject.lease_until < func.now()),
    )
    if failed_too:
        stale = or_(
            stale, and_(InboxObject.state == InboxState.failed, InboxObject.job_id.is_(None))
        )
    return session.execute(
        update(InboxObject)
        .where(InboxObject.id == object_id, stale)
        .values(
            state=InboxState.seen,
            attempt=InboxObject.attempt + 1,
            lease_until=_lease(lease_seconds),
            finished_at=None,
            updated_at=func.now(),
        )
        .returning(InboxObject.attempt)
    ).scalar_one_or_none()


def _held(object_id: uuid.UUID, attempt: int, *states: str) -> Any:
    return and_(
        InboxObject.id == object_id,
        InboxObject.attempt == attempt,
        InboxObject.state.in_(states),
    )


def extend_lease(
    *, session: Session, object_id: uuid.UUID, attempt: int, lease_seconds: float
) -> bool:
    """Push out the lease of an ingest still running; False when another tick took it over."""
    result = session.execute(
        update(InboxObject)
        .where(_held(object_id, attempt, InboxState.seen))
        .values(lease_until=_lease(lease_seconds))
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def release(
    *, session: Session, object_id: uuid.UUID, attempt: int, reason: str, retry_seconds: float
) -> bool:
    """Leave a `seen` object for a later tick, saying what it waits for."""
    result = session.execute(
        update(InboxObject)
        .where(_held(object_id, attempt, InboxState.seen))
        .values(reason=reason, lease_until=_lease(retry_seconds), updated_at=func.now())
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def mark_ingested(*, session: Session, object_id: uuid.UUID, attempt: int) -> bool:
    """The ingest's fence: True for exactly one holder of the row, which then creates the job in
    the same transaction. A holder whose lease was taken over gets False and must roll back."""
    won = session.execute(
        update(InboxObject)
        .where(_held(object_id, attempt, InboxState.seen))
        .values(
            state=InboxState.ingested,
            reason=None,
            lease_until=None,
            ingested_at=func.now(),
            updated_at=func.now(),
        )
        .returning(InboxObject.id)
    ).scalar_one_or_none()
    return won is not None


def link_job(*, session: Session, object_id: uuid.UUID, job_id: uuid.UUID) -> None:
    """Record the job (inserted after mark_ingested in the same transaction: foreign key)."""
    session.execute(update(InboxObject).where(InboxObject.id == object_id).values(job_id=job_id))


def mark_running(*, session: Session, object_id: uuid.UUID) -> bool:
    result = session.execute(
        update(InboxObject)
        .where(InboxObject.id == object_id, InboxObject.state == InboxState.ingested)
        .values(state=InboxState.running, updated_at=func.now())
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def claim_finalize(*, session: Session, object_id: uuid.UUID, lease_seconds: float) -> int | None:
    """Hold an object whose job finished while its outputs are written and its input moved."""
    return session.execute(
        update(InboxObject)
        .where(
            InboxObject.id == object_id,
            InboxObject.state.in_((InboxState.ingested, InboxState.running)),
            or_(InboxObject.lease_until.is_(None), InboxObject.lease_until < func.now()),
        )
        .values(attempt=InboxObject.attempt + 1, lease_until=_lease(lease_seconds))
        .returning(InboxObject.attempt)
    ).scalar_one_or_none()


def mark_done(*, session: Session, object_id: uuid.UUID, attempt: int) -> bool:
    result = session.execute(
        update(InboxObject)
        .where(_held(object_id, attempt, InboxState.ingested, InboxState.running))
        .values(
            state=InboxState.done, lease_until=None, finished_at=func.now(), updated_at=func.now()
        )
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def mark_failed(*, session: Session, object_id: uuid.UUID, attempt: int, reason: str) -> bool:
    active = (InboxState.seen, InboxState.ingested, InboxState.running)
    result = session.execute(
        update(InboxObject)
        .where(_held(object_id, attempt, *active))
        .values(
            state=InboxState.failed,
            reason=reason,
            lease_until=None,
            finished_at=func.now(),
            updated_at=func.now(),
        )
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def known_objects(
    *, session: Session, bucket: str, keys: Iterable[str]
) -> dict[tuple[str, str], InboxObject]:
    """Rows of these keys, by (key, etag)."""
    rows = session.scalars(
        select(InboxObject).where(InboxObject.bucket == bucket, InboxObject.key.in_(list(keys)))
    )
    return {(row.key, row.etag): row for row in rows}


def stale_objects(*, session: Session, bucket: str, limit: int) -> list[InboxObject]:
    """`seen` objects nobody holds: a waiting object's retry is due, or its ingester died."""
    return list(
        session.scalars(
            select(InboxObject)
            .where(
                InboxObject.bucket == bucket,
                InboxObject.state == InboxState.seen,
                InboxObject.lease_until < func.now(),
            )
            .order_by(InboxObject.lease_until)
            .limit(limit)
        )
    )


def unpublished_objects(*, session: Session, limit: int) -> list[InboxObject]:
    """Committed jobs whose shards may not be published yet (the tick died in between)."""
    return list(
        session.scalars(
            select(InboxObject).where(InboxObject.state == InboxState.ingested).limit(limit)
        )
    )


def finished_objects(*, session: Session, limit: int) -> list[tuple[InboxObject, str]]:
    """Objects whose job completed, failed or was cancelled, with that status, free to finalize."""
    rows = session.execute(
        select(InboxObject, Job.status)
        .join(Job, Job.id == InboxObject.job_id)
        .where(
            InboxObject.state.in_((InboxState.ingested, InboxState.running)),
            Job.status.in_(FINISHED_JOB),
            or_(InboxObject.lease_until.is_(None), InboxObject.lease_until < func.now()),
        )
        .order_by(Job.finished_at)
        .limit(limit)
    ).all()
    return [(row, str(status)) for row, status in rows]


def inbox_report(*, session: Session, state: str | None = None, limit: int = 50) -> dict[str, Any]:
    """What `postroom inbox status` shows: counts per state and the latest objects."""
    counts = dict(
        session.execute(select(InboxObject.state, func.count()).group_by(InboxObject.state)).all()
    )
    query = (
        select(InboxObject, Job.status)
        .outerjoin(Job, Job.id == InboxObject.job_id)
        .order_by(InboxObject.seen_at.desc(), InboxObject.key)
        .limit(limit)
    )
    if state:
        query = query.where(InboxObject.state == state)
    objects = [
        {
            "bucket": row.bucket,
            "key": row.key,
            "etag": row.etag,
            "size": row.size,
            "state": row.state,
            "job_id": str(row.job_id) if row.job_id else None,
            "job_status": job_status,
            "reason": row.reason,
            "seen_at": row.seen_at.isoformat(),
            "updated_at": row.updated_at.isoformat(),
        }
        for row, job_status in session.execute(query).all()
    ]
    return {
        "counts": {s.value: int(counts.get(s.value, 0)) for s in InboxState},
        "objects": objects,
    }
