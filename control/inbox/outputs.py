"""What the drop folder writes, for `postroom beat`: inputs moved to done/ or failed/ (with the
reason next to them), results and errors in outbox/, and the doorbells of committed jobs."""

from __future__ import annotations

import contextlib
import logging
import tempfile
import uuid
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from control.inbox.deps import InboxDeps
from control.inbox.objects import DropObject
from control.inbox.rows import (
    BATCH,
    claim_finalize,
    finished_objects,
    job_error,
    mark_done,
    mark_failed,
    mark_running,
    unpublished_objects,
)
from postroom.db.inbox_models import InboxObject
from postroom.domain import JobStatus
from postroom.exports import spool_results
from postroom.keys import (
    done_key,
    failed_key,
    failed_reason_key,
    outbox_errors_key,
    outbox_parquet_key,
    outbox_results_key,
)
from postroom.queue import publish_job
from postroom.result_formats import MEDIA_TYPES
from postroom.results import count_results, iter_result_lines
from postroom.storage import NoSuchObject, ObjectChanged, StorageError, encode_jsonl

logger = logging.getLogger(__name__)

SPOOL_BYTES = 8 * 1024 * 1024  # results past this spill from memory to a temporary file


def move_object(deps: InboxDeps, obj: DropObject, dest: str, *, reason: str = "") -> bool:
    """Copy exactly this version to `dest` (and write `reason` next to it in failed/), then
    delete it from the inbox unless it was replaced meanwhile. False when it is gone or replaced
    already: an earlier try moved it, so nothing is written. The reason is written before the
    delete, so a crash in between leaves the object in the inbox to be moved again."""
    storage = deps.storage
    try:
        storage.copy(obj.key, dest, bucket=obj.bucket, if_match=obj.etag, size=obj.size)
    except (NoSuchObject, ObjectChanged):
        return False
    if reason:
        storage.put_bytes(
            failed_reason_key(deps.prefix, obj.folder, obj.file),
            (reason.rstrip() + "\n").encode(),
            content_type="text/plain; charset=utf-8",
            bucket=obj.bucket,
        )
    with contextlib.suppress(NoSuchObject, ObjectChanged):
        storage.delete(obj.key, bucket=obj.bucket, if_match=obj.etag)
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
        except (StorageError, SQLAlchemyError) as e:
            logger.warning("inbox: outputs of %s left for a later tick: %s", row.key, e)
    return finalized


def finalize_object(deps: InboxDeps, row: InboxObject, *, status: str, attempt: int) -> None:
    """Write the outbox files of a finished job, then move its input to done/ (or failed/).
    Every step overwrites the same keys, so a finalize that died is simply done again."""
    obj = DropObject.of_row(row)
    job_id = row.job_id or row.id
    if row.results_format == "parquet":
        results = outbox_parquet_key(deps.prefix, obj.folder, obj.file)
        lines = upload_parquet(deps, obj.bucket, results, job_id=job_id)
    else:
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
        error = job_error(session=session, job_id=job_id)
    ended = "failed: not one document succeeded" if status == JobStatus.failed else f"was {status}"
    reason = (
        f"job {job_id} {ended}{f' ({error})' if error else ''}; the results of the documents "
        f"that finished ({lines:,}) are in {results}. Change the file's content (a blank line "
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
            deps.storage.delete(key, bucket=bucket)
            return 0
        deps.storage.upload_file(key, spool, content_type="application/x-ndjson", bucket=bucket)
    return count


def upload_parquet(deps: InboxDeps, bucket: str, key: str, *, job_id: uuid.UUID) -> int:
    """The job's results as Parquet (job.json's `"results_format": "parquet"`), written a row
    group at a time into a spooled file, then uploaded. Returns the number of rows."""
    spool, _ = spool_results(
        deps.sessions,
        job_id=job_id,
        format="parquet",
        row_group=deps.settings.results_parquet_row_group,
    )
    with spool:
        deps.storage.upload_file(key, spool, content_type=MEDIA_TYPES["parquet"], bucket=bucket)
    with deps.sessions() as session:
        return count_results(session=session, job_id=job_id)
