"""S3 event notifications into the drop folder, for event consumers (an SQS or webhook consumer
in any process; `postroom beat` lists the inbox too, and writes the outputs)."""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import unquote_plus

from control.inbox.deps import InboxDeps, default_deps
from control.inbox.objects import DropObject, locate, normalize_etag
from control.inbox.rows import known_objects
from control.inbox.tick import handle_object

logger = logging.getLogger(__name__)


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
