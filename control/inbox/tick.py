"""The drop folder's beat task in `postroom beat`: list a page of the inbox, hand each object
version to `handle_object` (which event consumers call too), publish and finalize."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sqlalchemy.exc import SQLAlchemyError

from control.inbox.deps import InboxDeps
from control.inbox.ingest import ingest_object, refuse_duplicate
from control.inbox.objects import DropObject, locate, normalize_etag
from control.inbox.outputs import finalize_finished, publish_pending
from control.inbox.rows import BATCH, claim_new, known_objects, reclaim, stale_objects
from postroom.db.inbox_models import InboxObject
from postroom.keys import drop_area
from postroom.storage import StorageError

logger = logging.getLogger(__name__)


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


def run_tick(deps: InboxDeps, cursor: InboxCursor | None = None) -> TickReport:
    """List a page of the inbox and ingest what is new; retry waiting or abandoned objects;
    publish committed jobs; write the outputs of finished ones. Safe to run twice or in two
    processes at once: every step is claimed by a compare-and-set on `inbox_objects`."""
    report = TickReport()
    cursor = cursor if cursor is not None else InboxCursor()
    try:
        objects, cursor.start_after = list_inbox(deps, start_after=cursor.start_after)
    except StorageError as e:
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
            report.count(handle_object(deps, DropObject.of_row(row), row))
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
    objects: list[DropObject] = []
    resume, held_back, token = start_after, False, ""
    while remaining > 0:
        page, token = deps.storage.list_page(
            drop_area(deps.prefix, "inbox"),
            bucket=deps.bucket,
            start_after=start_after,
            token=token,
            max_keys=min(1000, remaining),
        )
        for item in page:
            remaining -= 1
            if item.last_modified > settled_before:
                held_back = True
                continue
            if not held_back:
                resume = item.key
            located = locate(item.key, prefix=deps.prefix)
            if located is not None:
                folder, file = located
                etag = normalize_etag(item.etag)
                objects.append(
                    DropObject(
                        deps.bucket, item.key, etag, item.size, folder, file, item.last_modified
                    )
                )
        if not token:  # the end of the inbox
            return objects, resume if held_back else ""
    return objects, resume


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
    except (StorageError, SQLAlchemyError) as e:
        logger.warning("inbox: %s left for a later tick: %s", obj.key, e)
        return "errors"
