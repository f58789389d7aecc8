"""Beat task and event entry point of the S3 drop folder: `inbox/<name>/<file>` → one job per
(bucket, key, ETag) → `outbox/<name>/<file>.results.jsonl`, input moved to `done/` or `failed/`.

Two ways in, one way through: the beat tick lists the inbox (`run_tick`), and a deployment with S3
event notifications wires its SQS or webhook consumer to `ingest_events(notification)` or
`ingest_event(record)`. Both call `handle_object`, so a lost notification only delays an object
until the next tick, and a notification for an object the tick already took is a no-op.

Exactly once: a row of `inbox_objects` per (bucket, key, ETag), inserted `on conflict do nothing`
(only the inserter proceeds); the job's id is derived from the same triple, and the job is created
in the transaction that moves the row `seen → ingested` fenced on the claim's attempt number. A tick
that dies mid-ingest leaves a `seen` row whose lease runs out; a later tick takes it over and can
at most make that same job.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import tempfile
import time
import uuid
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_plus

from boto3.s3.transfer import TransferConfig
from botocore.exceptions import BotoCoreError, ClientError
from celery import Celery
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from postroom.db.inbox_models import InboxObject
from postroom.db.models import Job
from postroom.db.session import make_engine, make_sessionmaker
from postroom.domain import JobSpec, JobStatus
from postroom.errors import InvalidInput, UnknownModel
from postroom.inbox import (
    MAX_JOB_FILE_BYTES,
    DropObject,
    JobFile,
    NotReady,
    UnusableObject,
    check_data_file,
    claim_finalize,
    claim_new,
    extend_lease,
    finished_objects,
    gunzip_chunks,
    invalid_input_reason,
    known_objects,
    link_job,
    locate,
    mark_done,
    mark_failed,
    mark_ingested,
    mark_running,
    normalize_etag,
    parse_job_file,
    reclaim,
    release,
    stale_objects,
    unpublished_objects,
    waits_for_worker,
)
from postroom.intake import Intake, LineSplitter, feed_lines
from postroom.jobs import publish_job
from postroom.keys import (
    done_key,
    drop_area,
    failed_key,
    failed_reason_key,
    inbox_job_file_key,
    outbox_errors_key,
    outbox_results_key,
)
from postroom.queue import make_celery
from postroom.results import iter_result_lines
from postroom.settings import Settings, get_settings
from postroom.storage import Storage, encode_jsonl
from postroom.submit import (
    JobOptions,
    ShardWriter,
    check_intake,
    finish_submission,
    new_intake,
    prepare_spec,
)
from postroom.tenants import ensure_tenant

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import CopySourceTypeDef

logger = logging.getLogger(__name__)

READ_CHUNK = 1024 * 1024
SPOOL_BYTES = 8 * 1024 * 1024
BATCH = 100  # rows per query of the tick's retry, publish and finalize steps
NOT_JSONL_AFTER = 100  # invalid lines with none valid before a file is called "not JSONL"
COPY_LIMIT = 5 * 1024**3  # CopyObject's limit; larger objects are copied in parts
TRANSFER = TransferConfig(multipart_threshold=SPOOL_BYTES, max_concurrency=4)
GONE = ("NoSuchKey", "404", "NotFound")
CHANGED = ("PreconditionFailed", "412")


@dataclass
class InboxDeps:
    """What the inbox needs, built once per process (the beat's Control, a consumer, a test)."""

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

    @property
    def s3(self) -> S3Client:
        return self.storage.client


@functools.cache
def default_deps() -> InboxDeps:
    """Deps from the process's settings, for event consumers that have nothing else."""
    settings = get_settings()
    return InboxDeps(
        settings, make_sessionmaker(make_engine(settings)), Storage(settings), make_celery(settings)
    )


@dataclass
class InboxCursor:
    """Where the next tick's listing starts, so a large inbox is covered a page at a time."""

    start_after: str = ""


@dataclass
class TickReport:
    listed: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    published: int = 0
    finalized: int = 0

    def count(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1


class LostClaim(Exception):
    """Another tick took this object over (our lease ran out); stop without touching anything."""


class ObjectGone(Exception):
    """The object version was deleted or replaced before it was read; it needs no job."""


def _code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


def _quoted(etag: str) -> str:
    return f'"{etag}"'


# -- the tick


def run_tick(deps: InboxDeps, cursor: InboxCursor | None = None) -> TickReport:
    """List a page of the inbox and ingest what is new; retry waiting or abandoned objects;
    publish committed jobs; write the outputs of finished ones. Safe to run twice or in two
    processes at once: every step is claimed by a compare-and-set on `inbox_objects`."""
    report = TickReport()
    cursor = cursor if cursor is not None else InboxCursor()
    try:
        objects, cursor.start_after = list_inbox(deps, start_after=cursor.start_after)
    except (BotoCoreError, ClientError) as e:
        logger.warning("inbox: cannot list s3://%s/%s: %s", deps.bucket, deps.prefix, e)
        objects = []
    report.listed = len(objects)
    with deps.sessions() as session:
        known = known_objects(session=session, bucket=deps.bucket, keys=[o.key for o in objects])
    for obj in objects:
        report.count(handle_object(deps, obj, known.get((obj.key, obj.etag))))
    with deps.sessions() as session:
        stale = stale_objects(session=session, bucket=deps.bucket, limit=BATCH)
    handled = {obj.id for obj in objects}
    for row in stale:
        if row.id not in handled:  # a waiting object released just now is due next tick
            report.count(handle_object(deps, _drop_object(row), row))
    report.published = publish_pending(deps)
    report.finalized = finalize_finished(deps)
    if report.outcomes.keys() - {"skipped"} or report.published or report.finalized:
        logger.info(
            "inbox: %d listed, %s, %d published, %d finalized",
            report.listed,
            ", ".join(f"{n} {o}" for o, n in sorted(report.outcomes.items())),
            report.published,
            report.finalized,
        )
    return report


def list_inbox(deps: InboxDeps, *, start_after: str) -> tuple[list[DropObject], str]:
    """Up to `inbox_max_objects_per_tick` settled objects after `start_after`, and the cursor
    for the next tick ("" once the end is reached). An object younger than the settle time
    holds the cursor back, so the next tick sees it again."""
    settings = deps.settings
    remaining = settings.inbox_max_objects_per_tick
    settled_before = datetime.now(UTC) - timedelta(seconds=settings.inbox_settle_seconds)
    params: dict[str, Any] = {"Bucket": deps.bucket, "Prefix": drop_area(deps.prefix, "inbox")}
    if start_after:
        params["StartAfter"] = start_after
    objects: list[DropObject] = []
    resume, held_back, exhausted = start_after, False, False
    while remaining > 0:
        page = deps.s3.list_objects_v2(**params, MaxKeys=min(1000, remaining))
        for item in page.get("Contents", []):
            remaining -= 1
            if item["LastModified"] > settled_before:
                held_back = True
                continue
            if not held_back:
                resume = item["Key"]
            located = locate(item["Key"], prefix=deps.prefix)
            if located is not None:
                objects.append(
                    DropObject(
                        bucket=deps.bucket,
                        key=item["Key"],
                        etag=normalize_etag(item["ETag"]),
                        size=item["Size"],
                        folder=located[0],
                        file=located[1],
                        last_modified=item["LastModified"],
                    )
                )
        if not page.get("IsTruncated"):
            exhausted = True
            break
        params["ContinuationToken"] = page["NextContinuationToken"]
    return objects, "" if exhausted and not held_back else resume


def handle_object(deps: InboxDeps, obj: DropObject, row: InboxObject | None) -> str:
    """What happens to one object version present in the inbox, given its row (if any)."""
    lease = deps.settings.inbox_lease_seconds
    try:
        if row is None:
            with deps.sessions.begin() as session:
                attempt = claim_new(session=session, obj=obj, lease_seconds=lease)
        elif row.state == "seen" or (row.state == "failed" and row.job_id is None):
            # Waiting, abandoned by a dead tick, or failed without a job and uploaded again
            # (or not moved out yet): the outcome is the same job or the same failure.
            with deps.sessions.begin() as session:
                attempt = reclaim(
                    session=session, object_id=obj.id, lease_seconds=lease, failed_too=True
                )
        elif row.state in ("done", "failed"):
            return refuse_duplicate(deps, obj, row)
        else:
            return "skipped"  # ingested or running: its job is on its way
        if attempt is None:
            return "skipped"  # another watcher holds it
        return ingest_object(deps, obj, attempt=attempt)
    except (BotoCoreError, ClientError, SQLAlchemyError) as e:
        logger.warning("inbox: %s left for a later tick: %s", obj.key, e)
        return "errors"


def ingest_object(deps: InboxDeps, obj: DropObject, *, attempt: int) -> str:
    """Stream a claimed object into a job (through the same Intake and ShardWriter as
    POST /v1/jobs/upload), or fail it with a reason, or leave it waiting.

    Returns "ingested", "failed", "waiting" or "lost" (another tick took the object over).
    """
    settings = deps.settings
    writer = ShardWriter(deps.storage, obj.id)
    try:
        check_data_file(obj, prefix=deps.prefix)
        job_file = read_job_file(deps, obj)
        spec, warnings = _prepare(deps, obj, job_file.options)
        intake = stream_object(deps, obj, attempt=attempt, options=job_file.options, writer=writer)
    except NotReady as e:
        with deps.sessions.begin() as session:
            release(
                session=session,
                object_id=obj.id,
                attempt=attempt,
                reason=e.reason,
                retry_seconds=settings.inbox_interval_seconds,
            )
        return "waiting"
    except UnusableObject as e:
        return fail_object(deps, obj, attempt=attempt, reason=e.reason, writer=writer)
    except ObjectGone as e:
        with deps.sessions.begin() as session:
            mark_failed(session=session, object_id=obj.id, attempt=attempt, reason=str(e))
        return "failed"
    except LostClaim:
        return "lost"
    except (BotoCoreError, ClientError, SQLAlchemyError) as e:
        with deps.sessions.begin() as session:
            release(
                session=session,
                object_id=obj.id,
                attempt=attempt,
                reason=f"retrying after an error: {e}",
                retry_seconds=settings.inbox_interval_seconds,
            )
        raise
    try:
        with deps.sessions.begin() as session:
            if not mark_ingested(session=session, object_id=obj.id, attempt=attempt):
                return "lost"
            tenant = job_file.tenant or settings.inbox_tenant
            finish_submission(
                session=session,
                storage=deps.storage,
                tenant_id=ensure_tenant(session=session, name=tenant),
                job_id=obj.id,
                spec=spec,
                warnings=warnings,
                options=job_file.options,
                intake=intake,
                writer=writer,
                idempotency_key=None,
                body_hash=None,
                settings=settings,
            )
            link_job(session=session, object_id=obj.id, job_id=obj.id)
    except InvalidInput as e:  # rolled back: the row is still ours, and `seen`
        reason = invalid_input_reason(e, fix=f"Fix {obj.folder}/job.json or {obj.file}.")
        return fail_object(deps, obj, attempt=attempt, reason=reason, writer=writer)
    logger.info(
        "inbox: %s is job %s (%d documents, %d shards, %d invalid lines skipped)",
        obj.key,
        obj.id,
        intake.accepted,
        len(intake.shard_sizes),
        intake.rejected_count,
    )
    publish(deps, obj.id)
    return "ingested"


def read_job_file(deps: InboxDeps, obj: DropObject) -> JobFile:
    key = inbox_job_file_key(deps.prefix, obj.folder)
    try:
        body = deps.s3.get_object(Bucket=obj.bucket, Key=key)["Body"]
    except ClientError as e:
        if _code(e) in GONE:
            raise NotReady(
                f"waiting for {key}: upload a job.json with the labels next to {obj.file}"
            ) from e
        raise
    with contextlib.closing(body):
        return parse_job_file(body.read(MAX_JOB_FILE_BYTES + 1), where=key)


def _prepare(deps: InboxDeps, obj: DropObject, options: JobOptions) -> tuple[JobSpec, list[str]]:
    job_key = inbox_job_file_key(deps.prefix, obj.folder)
    fix = f"Fix {job_key}, then upload {obj.file} to the inbox again."
    with deps.sessions() as session:
        try:
            options.deadline_at(datetime.now(UTC))
            return prepare_spec(options, session=session, settings=deps.settings)
        except UnknownModel as e:
            if waits_for_worker(options, deps.settings):
                raise NotReady(f"waiting for a worker: {e.message}") from e
            raise UnusableObject(invalid_input_reason(e, fix=fix)) from e
        except InvalidInput as e:
            raise UnusableObject(invalid_input_reason(e, fix=fix)) from e


def object_chunks(deps: InboxDeps, obj: DropObject) -> Generator[bytes, None, None]:
    """This ETag's version of the object (decompressed when .gz), a chunk at a time."""
    try:
        response = deps.s3.get_object(Bucket=obj.bucket, Key=obj.key, IfMatch=_quoted(obj.etag))
    except ClientError as e:
        if _code(e) in GONE:
            raise ObjectGone(f"{obj.key} was deleted before it was read") from e
        if _code(e) in CHANGED:
            raise ObjectGone(
                f"{obj.key} was replaced by a newer upload before it was read; "
                "the newer version becomes its own job"
            ) from e
        raise
    body = response["Body"]
    with contextlib.closing(body):
        chunks: Iterator[bytes] = body.iter_chunks(READ_CHUNK)
        if obj.gzip:
            chunks = gunzip_chunks(
                chunks,
                name=obj.file,
                max_bytes=deps.settings.inbox_max_decompressed_bytes,
                max_ratio=deps.settings.inbox_max_gzip_ratio,
            )
        yield from chunks


def stream_object(
    deps: InboxDeps, obj: DropObject, *, attempt: int, options: JobOptions, writer: ShardWriter
) -> Intake:
    """Feed the object through LineSplitter and Intake, writing each full shard to S3 as it
    fills; memory holds one chunk, one shard and the ids seen. Keeps the claim's lease fresh."""
    settings = deps.settings
    intake = new_intake(settings, writer, on_invalid=options.on_invalid)
    splitter = LineSplitter(settings.max_document_bytes)
    renew_every = settings.inbox_lease_seconds / 3
    renew_at = time.monotonic() + renew_every
    with contextlib.closing(object_chunks(deps, obj)) as chunks:
        for chunk in chunks:
            feed_lines(intake, splitter.feed(chunk))
            writer.drain()
            _refuse_early(intake, obj, options, settings)
            if time.monotonic() >= renew_at:
                _renew(deps, obj, attempt=attempt)
                renew_at = time.monotonic() + renew_every
    feed_lines(intake, splitter.end())
    intake.finish()
    if intake.accepted == 0 and intake.rejected_count:
        raise UnusableObject(_not_jsonl(intake, obj))
    try:
        check_intake(intake, options, settings=settings)
    except InvalidInput as e:
        raise UnusableObject(invalid_input_reason(e, fix=_fix_lines(obj))) from e
    writer.flush()
    return intake


def _renew(deps: InboxDeps, obj: DropObject, *, attempt: int) -> None:
    with deps.sessions.begin() as session:
        if not extend_lease(
            session=session,
            object_id=obj.id,
            attempt=attempt,
            lease_seconds=deps.settings.inbox_lease_seconds,
        ):
            raise LostClaim(obj.key)


def _refuse_early(intake: Intake, obj: DropObject, options: JobOptions, settings: Settings) -> None:
    """Stop reading a file that is already refused, instead of validating gigabytes of it."""
    if intake.accepted == 0 and intake.rejected_count >= NOT_JSONL_AFTER:
        raise UnusableObject(_not_jsonl(intake, obj))
    if options.on_invalid == "reject" and intake.rejected_count > settings.max_error_details:
        try:
            check_intake(intake, options, settings=settings)
        except InvalidInput as e:
            fix = f"(reading stopped at line {intake.lines:,}) {_fix_lines(obj)}"
            raise UnusableObject(invalid_input_reason(e, fix=fix)) from e


def _not_jsonl(intake: Intake, obj: DropObject) -> str:
    first = intake.rejected[0]
    return (
        f'{obj.file} is not JSONL: no line is a JSON document like {{"id": "1", "text": "…"}} '
        f"(line {first.line}: {first.reason}). Fix the file, or export it again as JSON "
        "Lines, and upload it again."
    )


def _fix_lines(obj: DropObject) -> str:
    return (
        f'Fix those lines of {obj.file} and upload it again, or set "on_invalid": "skip" in '
        f"{obj.folder}/job.json to run the valid lines (the others become failed results)."
    )


def fail_object(
    deps: InboxDeps, obj: DropObject, *, attempt: int, reason: str, writer: ShardWriter
) -> str:
    """Record the failure, then move the object to failed/ next to its reason. Marking first
    means a crash before the move leaves a failed row and the object in the inbox: the next
    tick tries it again, fails the same way and moves it."""
    with deps.sessions.begin() as session:
        if not mark_failed(session=session, object_id=obj.id, attempt=attempt, reason=reason):
            return "lost"
    writer.discard()
    move_to_failed(deps, obj, reason)
    logger.info("inbox: %s failed: %s", obj.key, reason.splitlines()[0])
    return "failed"


def refuse_duplicate(deps: InboxDeps, obj: DropObject, row: InboxObject) -> str:
    """The very same version was processed already (it was uploaded again): no second job."""
    results = outbox_results_key(deps.prefix, obj.folder, obj.file)
    moved = move_to_failed(
        deps,
        obj,
        f"{obj.file} with this exact content (ETag {obj.etag}) was already processed as job "
        f"{row.job_id} ({row.state}); its results are in {results}. Each version of a file "
        "becomes one job: change the content (a blank line is enough) to run it again.",
    )
    return "duplicate" if moved else "skipped"


# -- S3 moves and outputs


def move_object(deps: InboxDeps, obj: DropObject, dest: str, *, reason: str = "") -> bool:
    """Copy exactly this version to `dest` (and write `reason` next to it in failed/), then
    delete it from the inbox unless it was replaced meanwhile. False when it is gone or replaced
    already: an earlier try moved it, so nothing is written. The reason is written before the
    delete, so a crash in between leaves the object in the inbox to be moved again."""
    source: CopySourceTypeDef = {"Bucket": obj.bucket, "Key": obj.key}
    try:
        if obj.size < COPY_LIMIT:
            deps.s3.copy_object(
                Bucket=obj.bucket, Key=dest, CopySource=source, CopySourceIfMatch=_quoted(obj.etag)
            )
        else:
            deps.s3.copy(
                source, obj.bucket, dest, ExtraArgs={"CopySourceIfMatch": _quoted(obj.etag)}
            )
    except ClientError as e:
        if _code(e) in GONE + CHANGED:
            return False
        raise
    if reason:
        deps.s3.put_object(
            Bucket=obj.bucket,
            Key=failed_reason_key(deps.prefix, obj.folder, obj.file),
            Body=(reason.rstrip() + "\n").encode(),
            ContentType="text/plain; charset=utf-8",
        )
    try:
        deps.s3.delete_object(Bucket=obj.bucket, Key=obj.key, IfMatch=_quoted(obj.etag))
    except ClientError as e:
        if _code(e) not in GONE + CHANGED:
            raise
    return True


def move_to_failed(deps: InboxDeps, obj: DropObject, reason: str) -> bool:
    return move_object(deps, obj, failed_key(deps.prefix, obj.folder, obj.file), reason=reason)


def publish(deps: InboxDeps, job_id: uuid.UUID) -> int:
    """Ring the doorbell for a committed job's shards; a broker outage leaves them to the reaper."""
    with deps.sessions.begin() as session:
        published = publish_job(session=session, celery=deps.celery, job_id=job_id)
        mark_running(session=session, object_id=job_id)
    return published


def publish_pending(deps: InboxDeps) -> int:
    with deps.sessions() as session:
        rows = unpublished_objects(session=session, limit=BATCH)
    for row in rows:
        publish(deps, row.id)
    return len(rows)


def finalize_finished(deps: InboxDeps) -> int:
    with deps.sessions() as session:
        rows = finished_objects(session=session, limit=BATCH)
    finalized = 0
    for row, status in rows:
        with deps.sessions.begin() as session:
            attempt = claim_finalize(
                session=session, object_id=row.id, lease_seconds=deps.settings.inbox_lease_seconds
            )
        if attempt is None:
            continue
        try:
            finalize_object(deps, row, status=status, attempt=attempt)
            finalized += 1
        except (BotoCoreError, ClientError, SQLAlchemyError) as e:
            logger.warning("inbox: outputs of %s left for a later tick: %s", row.key, e)
    return finalized


def finalize_object(deps: InboxDeps, row: InboxObject, *, status: str, attempt: int) -> None:
    """Write the outbox files of a finished job, then move its input to done/ (or failed/).
    Every step overwrites the same keys, so a finalize that died is simply done again."""
    obj = _drop_object(row)
    job_id = row.job_id or row.id
    results = outbox_results_key(deps.prefix, obj.folder, obj.file)
    lines = upload_results(deps, obj.bucket, results, job_id=job_id, only_failed=False)
    errors = upload_results(
        deps,
        obj.bucket,
        outbox_errors_key(deps.prefix, obj.folder, obj.file),
        job_id=job_id,
        only_failed=True,
    )
    if status == JobStatus.completed:
        move_object(deps, obj, done_key(deps.prefix, obj.folder, obj.file))
        with deps.sessions.begin() as session:
            mark_done(session=session, object_id=row.id, attempt=attempt)
        logger.info("inbox: %s done: %d results, %d failed, in %s", obj.key, lines, errors, results)
        return
    with deps.sessions() as session:
        job = session.get(Job, job_id)
        error = f" ({job.error})" if job is not None and job.error else ""
    reason = (
        f"job {job_id} was {status}{error} before every document finished; the results of "
        f"those that did ({lines:,}) are in {results}. Change the file's content (a blank line "
        "is enough) and upload it again to run it as a new job."
    )
    move_to_failed(deps, obj, reason)
    with deps.sessions.begin() as session:
        mark_failed(session=session, object_id=row.id, attempt=attempt, reason=reason)


def upload_results(
    deps: InboxDeps, bucket: str, key: str, *, job_id: uuid.UUID, only_failed: bool
) -> int:
    """Stream a job's result lines (the API's shape, input order) into a spooled temp file, then
    upload it (multipart past 8 MiB). With `only_failed` and no failures the key is deleted, so
    a stale errors file of an earlier version does not linger. Returns the number of lines."""
    count = 0
    with tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES) as spool:
        with deps.sessions() as session:
            batch: list[dict[str, Any]] = []
            for line in iter_result_lines(session=session, job_id=job_id, only_failed=only_failed):
                batch.append(line)
                if len(batch) == 1000:
                    spool.write(encode_jsonl(batch))
                    count += len(batch)
                    batch.clear()
            spool.write(encode_jsonl(batch))
            count += len(batch)
        if only_failed and count == 0:
            deps.s3.delete_object(Bucket=bucket, Key=key)
            return 0
        spool.seek(0)
        deps.s3.upload_fileobj(
            spool,
            bucket,
            key,
            ExtraArgs={"ContentType": "application/x-ndjson"},
            Config=TRANSFER,
        )
    return count


def _drop_object(row: InboxObject) -> DropObject:
    return DropObject(
        bucket=row.bucket,
        key=row.key,
        etag=row.etag,
        size=row.size,
        folder=row.folder,
        file=row.file,
    )


# -- S3 event notifications


def parse_event_record(record: dict[str, Any]) -> tuple[str, str, str, int] | None:
    """(bucket, key, etag, size) of an S3 event record, or None when it is not an object creation.

    Accepts a record of an S3 notification (`{"eventName": "ObjectCreated:Put", "s3": {"bucket":
    {"name"}, "object": {"key" (URL-encoded), "eTag", "size"}}}`) or a flat
    `{"bucket", "key", "eTag", "size"}`.
    """
    if "s3" in record:
        if not str(record.get("eventName", "ObjectCreated:")).startswith("ObjectCreated:"):
            return None
        s3 = record["s3"]
        bucket, obj = s3["bucket"]["name"], s3["object"]
        key = unquote_plus(obj["key"])
    else:
        bucket, obj, key = record["bucket"], record, record["key"]
    etag = obj.get("eTag") or obj.get("etag") or obj.get("ETag")
    if not etag:
        raise ValueError(f"S3 event record for {key!r} has no eTag")
    return str(bucket), str(key), normalize_etag(str(etag)), int(obj.get("size", 0))


def ingest_event(record: dict[str, Any], *, deps: InboxDeps | None = None) -> str:
    """Ingest the object of one S3 event record now, in the caller's process.

    Wire an SQS or webhook consumer to this (or to `ingest_events` for a whole notification);
    no beat needs to be running for ingest, but `postroom beat` writes the outputs once the job
    finishes. Safe to call twice, late, or for an object the tick already took: returns
    "ingested", "failed", "waiting", "skipped" (taken already), "duplicate" or "ignored".
    """
    deps = deps or default_deps()
    parsed = parse_event_record(record)
    if parsed is None:
        return "ignored"
    bucket, key, etag, size = parsed
    located = locate(key, prefix=deps.prefix)
    if bucket != deps.bucket or located is None:
        logger.info("inbox: event for s3://%s/%s is not for the inbox; ignored", bucket, key)
        return "ignored"
    obj = DropObject(bucket, key, etag, size, folder=located[0], file=located[1])
    with deps.sessions() as session:
        row = known_objects(session=session, bucket=bucket, keys=[key]).get((key, etag))
    return handle_object(deps, obj, row)


def ingest_events(event: dict[str, Any], *, deps: InboxDeps | None = None) -> list[str]:
    """Every record of one S3 event notification (an SQS message body, a webhook payload)."""
    return [ingest_event(record, deps=deps) for record in event.get("Records", [])]
