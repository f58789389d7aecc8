"""`input_uri`: which S3 objects a job may read (the deployment's policy), and reading one into a
Submission a chunk at a time."""

from __future__ import annotations

from postroom.errors import InputUriNotAllowed, InvalidInput, PayloadTooLarge, Unavailable
from postroom.jsonsafe import show
from postroom.keys import drop_area
from postroom.settings import Settings
from postroom.storage import NoSuchObject, Storage, StorageError
from postroom.submit import Submission

GZIP_ENCODINGS = frozenset({"gzip", "x-gzip"})
# Where Postroom keeps its own objects: `input_uri` may not read them (another tenant's inputs).
OWN_PREFIXES = ("inputs/", "results/", "files/", "batches/")
CHUNK_BYTES = 1 << 16


def input_location(uri: str, *, settings: Settings) -> tuple[str, str]:
    """(bucket, key) of an `input_uri`, if the deployment lets jobs read it: only the buckets of
    POSTROOM_INPUT_URI_BUCKETS (default: POSTROOM_S3_BUCKET), and never Postroom's own objects
    there (other jobs' inputs and results, batch files, the drop folder)."""
    allowed = settings.input_buckets()
    where = " or ".join(f"s3://{b}/" for b in allowed)
    if not uri.startswith("s3://"):
        raise InvalidInput(
            f"input_uri: must look like s3://<bucket>/<key>.jsonl, in {where}",
            details=[{"field": "input_uri", "reason": "not an s3:// URI", "allowed": allowed}],
        )
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if bucket not in allowed:
        raise InputUriNotAllowed(
            f"input_uri: bucket {show(bucket, 63)!r} is not allowed here; put the file in "
            f"{where} (POSTROOM_INPUT_URI_BUCKETS)",
            details=[{"field": "input_uri", "reason": "bucket not allowed", "allowed": allowed}],
        )
    if not key or key.endswith("/"):
        raise InvalidInput(
            "input_uri: names no object; give the key of one .jsonl or .jsonl.gz file",
            details=[{"field": "input_uri", "reason": "no key"}],
        )
    if bucket in (settings.s3_bucket, settings.inbox_bucket or settings.s3_bucket):
        areas = ("inbox", "outbox", "done", "failed")
        own = (*OWN_PREFIXES, *(drop_area(settings.inbox_prefix, area) for area in areas))
        hit = next((prefix for prefix in own if key.startswith(prefix)), None)
        if hit is not None:
            raise InputUriNotAllowed(
                f"input_uri: {hit} holds Postroom's own objects and cannot be read as input; "
                "put your file elsewhere in the bucket",
                details=[{"field": "input_uri", "reason": f"under {hit}"}],
            )
    return bucket, key


def read_object(
    storage: Storage,
    bucket: str,
    key: str,
    *,
    uri: str,
    submission: Submission,
    settings: Settings,
) -> str:
    """Stream the object of an allowed `input_uri` (see input_location; gunzipped when .gz) into
    the submission; returns its ETag. A missing or unreadable object is the caller's to fix
    (422); an S3 outage is a 503 to retry."""
    name = show(uri, 200)
    try:
        obj = storage.open(key, bucket=bucket)
    except StorageError as e:
        if e.status >= 500 or (e.status == 0 and not isinstance(e, NoSuchObject)):
            raise Unavailable(f"S3 could not serve {name} ({e.code}); retry later") from e
        raise InvalidInput(
            f"input_uri: cannot read {name} ({e.code}); check the bucket and the key, and that "
            "Postroom's S3 credentials may read it",
            details=[{"field": "input_uri", "reason": e.code}],
        ) from e
    with obj:
        if obj.size > settings.max_upload_bytes:
            raise PayloadTooLarge(
                f"{name} is over {settings.max_upload_bytes:,} bytes (POSTROOM_MAX_UPLOAD_BYTES); "
                "split it into smaller files",
                details=[{"field": "input_uri", "reason": "object over the limit"}],
            )
        gzip = key.endswith(".gz") or obj.content_encoding in GZIP_ENCODINGS
        submission.open_stream(gzip=gzip, name=name)
        try:
            for chunk in obj.chunks(CHUNK_BYTES):
                submission.feed(chunk)
        except StorageError as e:
            raise Unavailable(f"reading {name} from S3 failed ({e.code}); retry") from e
    return obj.etag
