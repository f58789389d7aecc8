"""Ingest, for `postroom beat` and event consumers: a claimed object version of the drop folder
becomes a job through the one submission path (`postroom.submit.Submission`, as for
POST /v1/jobs/upload), or fails with a reason that says what to fix, or waits."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime

from sqlalchemy.exc import SQLAlchemyError

from control.inbox.deps import InboxDeps
from control.inbox.objects import (
    MAX_JOB_FILE_BYTES,
    DropObject,
    JobFile,
    NotReady,
    UnusableObject,
    check_data_file,
    invalid_input_reason,
    parse_job_file,
    waits_for_worker,
)
from control.inbox.outputs import move_to_failed, publish
from control.inbox.rows import extend_lease, link_job, mark_failed, mark_ingested, release
from postroom.db.inbox_models import InboxObject
from postroom.errors import InvalidDocuments, InvalidInput, PostroomError, UnknownModel
from postroom.intake import Intake
from postroom.job_options import JobOptions
from postroom.keys import inbox_job_file_key, outbox_results_key
from postroom.lines import StreamLimits
from postroom.storage import NoSuchObject, ObjectChanged, S3Object, StorageError
from postroom.submit import Submission
from postroom.tenants import ensure_tenant

logger = logging.getLogger(__name__)

READ_CHUNK = 1024 * 1024
NOT_JSONL_AFTER = 100  # invalid lines with none valid before a file is called "not JSONL"


class LostClaim(Exception):
    """Another tick took this object over (our lease ran out); stop without touching anything."""


class ObjectGone(Exception):
    """The object version was deleted or replaced before it was read; it needs no job."""


def ingest_object(deps: InboxDeps, obj: DropObject, *, attempt: int) -> str:
    """Stream a claimed object into a job, or fail it with a reason, or leave it waiting.

    Returns "ingested", "failed", "waiting" or "lost" (another tick took the object over). The
    submission is not a `with` block: its discard on any error would delete the shards of a tick
    that took a lost claim over (the same job id, so the same keys). Only a failure discards.
    """
    submission: Submission | None = None
    try:
        check_data_file(obj, prefix=deps.prefix)
        job_file = read_job_file(deps, obj)
        submission = start_submission(deps, obj, job_file.options)
        stream_object(deps, obj, submission, attempt=attempt)
    except NotReady as e:
        _release(deps, obj, attempt=attempt, reason=e.reason)
        return "waiting"
    except UnusableObject as e:
        return fail_object(deps, obj, attempt=attempt, reason=e.reason, submission=submission)
    except ObjectGone as e:
        with deps.sessions.begin() as session:
            mark_failed(session=session, object_id=obj.id, attempt=attempt, reason=str(e))
        return "failed"
    except LostClaim:
        return "lost"
    except (StorageError, SQLAlchemyError) as e:
        _release(deps, obj, attempt=attempt, reason=f"retrying after an error: {e}")
        raise
    return record_object(deps, obj, submission, attempt=attempt, job_file=job_file)


def record_object(
    deps: InboxDeps, obj: DropObject, submission: Submission, *, attempt: int, job_file: JobFile
) -> str:
    """Create the job in the transaction that moves the row `seen → ingested` (fenced on the
    claim's attempt), then publish it."""
    try:
        with deps.sessions.begin() as session:
            if not mark_ingested(session=session, object_id=obj.id, attempt=attempt):
                return "lost"
            tenant = job_file.tenant or deps.settings.inbox_tenant
            submission.record(
                session=session, tenant_id=ensure_tenant(session=session, name=tenant)
            )
            link_job(
                session=session,
                object_id=obj.id,
                job_id=obj.id,
                results_format=job_file.results_format,
            )
    except InvalidInput as e:  # rolled back: the row is still ours, and `seen`
        reason = invalid_input_reason(e, fix=f"Fix {obj.folder}/job.json or {obj.file}.")
        return fail_object(deps, obj, attempt=attempt, reason=reason, submission=submission)
    intake = submission.intake
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
        body = deps.storage.open(key, bucket=obj.bucket)
    except NoSuchObject as e:
        raise NotReady(
            f"waiting for {key}: upload a job.json with the labels next to {obj.file}"
        ) from e
    with body:
        return parse_job_file(body.read(MAX_JOB_FILE_BYTES + 1), where=key)


def start_submission(deps: InboxDeps, obj: DropObject, options: JobOptions) -> Submission:
    """Check the job's deadline, labels and model before a byte of the object is read."""
    job_key = inbox_job_file_key(deps.prefix, obj.folder)
    fix = f"Fix {job_key}, then upload {obj.file} to the inbox again."
    with deps.sessions() as session:
        try:
            options.deadline_at(datetime.now(UTC))
            return Submission.start(
                options,
                session=session,
                storage=deps.storage,
                settings=deps.settings,
                job_id=obj.id,
            )
        except UnknownModel as e:
            if waits_for_worker(options, deps.settings):
                raise NotReady(f"waiting for a worker: {e.message}") from e
            raise UnusableObject(invalid_input_reason(e, fix=fix)) from e
        except InvalidInput as e:
            raise UnusableObject(invalid_input_reason(e, fix=fix)) from e


def stream_object(
    deps: InboxDeps, obj: DropObject, submission: Submission, *, attempt: int
) -> None:
    """Feed this version of the object (gunzipped when .gz) to the submission, which writes each
    full shard to S3 as it fills; memory holds a chunk, a few shards and the ids seen. Keeps the
    claim's lease fresh, and stops reading a file that is refused already."""
    settings = deps.settings
    submission.open_stream(gzip=obj.gzip, name=obj.file, limits=StreamLimits.drop_folder(settings))
    renew_every = settings.inbox_lease_seconds / 3
    renew_at = time.monotonic() + renew_every
    with _open_version(deps, obj) as body:
        for chunk in body.chunks(READ_CHUNK):
            try:
                submission.feed(chunk)
            except PostroomError as e:  # a gzip bomb, bytes that are not gzip, over the size
                raise UnusableObject(e.message) from e
            _refuse_early(submission, obj)
            if time.monotonic() >= renew_at:
                _renew(deps, obj, attempt=attempt)
                renew_at = time.monotonic() + renew_every
    _seal(submission, obj)


def _open_version(deps: InboxDeps, obj: DropObject) -> S3Object:
    """The object's version with this ETag, opened for reading."""
    try:
        return deps.storage.open(obj.key, bucket=obj.bucket, if_match=obj.etag)
    except NoSuchObject as e:
        raise ObjectGone(f"{obj.key} was deleted before it was read") from e
    except ObjectChanged as e:
        raise ObjectGone(
            f"{obj.key} was replaced by a newer upload before it was read; "
            "the newer version becomes its own job"
        ) from e


def _seal(submission: Submission, obj: DropObject) -> None:
    """End the stream and wait for the shard writes; refuse a file with no valid line, or with
    bad lines under on_invalid=reject, or cut off mid-gzip."""
    intake = submission.intake
    try:
        submission.seal()
    except InvalidDocuments as e:
        if intake.accepted == 0 and intake.rejected_count:
            raise UnusableObject(_not_jsonl(intake, obj)) from e
        raise UnusableObject(invalid_input_reason(e, fix=_fix_lines(obj))) from e
    except PostroomError as e:  # a truncated gzip stream
        raise UnusableObject(e.message) from e
    if intake.accepted == 0 and intake.rejected_count:  # on_invalid=skip, and no line was valid
        raise UnusableObject(_not_jsonl(intake, obj))


def _renew(deps: InboxDeps, obj: DropObject, *, attempt: int) -> None:
    with deps.sessions.begin() as session:
        if not extend_lease(
            session=session,
            object_id=obj.id,
            attempt=attempt,
            lease_seconds=deps.settings.inbox_lease_seconds,
        ):
            raise LostClaim(obj.key)


def _release(deps: InboxDeps, obj: DropObject, *, attempt: int, reason: str) -> None:
    """Leave the object for the next tick, saying why."""
    with deps.sessions.begin() as session:
        release(
            session=session,
            object_id=obj.id,
            attempt=attempt,
            reason=reason,
            retry_seconds=deps.settings.inbox_interval_seconds,
        )


def _refuse_early(submission: Submission, obj: DropObject) -> None:
    """Stop reading a file that is already refused, instead of validating gigabytes of it."""
    intake = submission.intake
    if intake.accepted == 0 and intake.rejected_count >= NOT_JSONL_AFTER:
        raise UnusableObject(_not_jsonl(intake, obj))
    if (
        submission.on_invalid == "reject"
        and intake.rejected_count > submission.settings.max_error_details
    ):
        try:
            submission.check()
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
    deps: InboxDeps,
    obj: DropObject,
    *,
    attempt: int,
    reason: str,
    submission: Submission | None = None,
) -> str:
    """Record the failure, delete the shards written so far, then move the object to failed/
    next to its reason. Marking first means a crash before the move leaves a failed row and the
    object in the inbox: the next tick tries it again, fails the same way and moves it."""
    with deps.sessions.begin() as session:
        if not mark_failed(session=session, object_id=obj.id, attempt=attempt, reason=reason):
            return "lost"
    if submission is not None:
        submission.discard()
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
