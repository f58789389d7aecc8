"""S3 through boto3: every S3 call Postroom makes, and the only module that imports boto3 or
botocore. Keys come from postroom.keys. botocore's errors leave here as `StorageError` (and its
subclasses for a missing object and a failed precondition), so callers catch one family.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import IO, TYPE_CHECKING, Any

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from postroom.errors import Unavailable
from postroom.settings import Settings

if TYPE_CHECKING:
    from botocore.response import StreamingBody
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import CopySourceTypeDef

COPY_LIMIT = 5 * 1024**3  # CopyObject's limit; larger objects are copied in parts
# Uploads of spooled files go multipart past 8 MiB, never whole in memory.
TRANSFER = TransferConfig(multipart_threshold=8 * 1024 * 1024, max_concurrency=4)
MISSING_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
CHANGED_CODES = frozenset({"PreconditionFailed", "412"})


class StorageError(Exception):
    """An S3 call failed: unreachable, throttled, refused (transient unless a subclass says
    otherwise). `code` is S3's error code (or botocore's error class), `status` its HTTP status
    (0 when no response came)."""

    def __init__(self, message: str, *, code: str, status: int = 0) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


class NoSuchObject(StorageError):
    """The object (or that version of it) does not exist."""


class ObjectChanged(StorageError):
    """A conditional call's precondition failed: the object was replaced meanwhile."""


@contextlib.contextmanager
def s3_errors(what: str) -> Iterator[None]:
    """Turn botocore's errors into StorageError; `what` names the call in the message."""
    try:
        yield
    except ClientError as e:
        code = str(e.response.get("Error", {}).get("Code", ""))
        status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        kind = (
            NoSuchObject
            if code in MISSING_CODES
            else ObjectChanged
            if code in CHANGED_CODES
            else StorageError
        )
        raise kind(f"S3 {what}: {code} ({e})", code=code, status=status) from e
    except BotoCoreError as e:
        raise StorageError(f"S3 {what}: {e}", code=e.__class__.__name__) from e


@dataclass(frozen=True)
class Listed:
    """One object of a listing."""

    key: str
    etag: str
    size: int
    last_modified: datetime


class S3Object:
    """An object opened for reading: its metadata now, its bytes a chunk at a time."""

    def __init__(self, response: Any, what: str) -> None:
        self._body: StreamingBody = response["Body"]
        self._what = what
        self.etag = str(response.get("ETag", ""))
        self.size = int(response.get("ContentLength", 0))
        self.content_encoding = str(response.get("ContentEncoding", "") or "")

    def chunks(self, size: int) -> Iterator[bytes]:
        with s3_errors(f"reading {self._what}"):
            yield from self._body.iter_chunks(size)

    def read(self, limit: int | None = None) -> bytes:
        with s3_errors(f"reading {self._what}"):
            return self._body.read(limit)

    def lines(self) -> Iterator[bytes]:
        with s3_errors(f"reading {self._what}"):
            yield from self._body.iter_lines()

    def close(self) -> None:
        self._body.close()

    def __enter__(self) -> S3Object:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class Storage:
    """One S3 client and a default bucket. Thread-safe (boto3 clients are)."""

    def __init__(self, settings: Settings) -> None:
        self.bucket = settings.s3_bucket
        secret = settings.s3_secret_access_key.get_secret_value()
        self.client: S3Client = boto3.client(
            "s3",
            endpoint_url=settings.s3_endpoint_url or None,
            region_name=settings.s3_region,
            aws_access_key_id=settings.s3_access_key_id or None,
            aws_secret_access_key=secret or None,
            config=Config(
                connect_timeout=min(10.0, settings.s3_timeout_seconds),
                read_timeout=settings.s3_timeout_seconds,
                retries={"max_attempts": 5, "mode": "standard"},
                max_pool_connections=32,
            ),
        )

    def ensure_bucket(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket"):
                raise
            self.client.create_bucket(Bucket=self.bucket)

    def check(self) -> None:
        """Raise Unavailable when the bucket cannot be reached (readiness)."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except (BotoCoreError, ClientError) as e:
            raise Unavailable(f"S3 bucket {self.bucket!r} is not reachable: {e}") from e

    def put_bytes(
        self,
        key: str,
        body: bytes,
        *,
        content_type: str = "application/x-ndjson",
        bucket: str | None = None,
    ) -> None:
        with s3_errors(f"writing {key}"):
            self.client.put_object(
                Bucket=bucket or self.bucket, Key=key, Body=body, ContentType=content_type
            )

    def put_jsonl(self, key: str, rows: Iterable[dict[str, Any]]) -> None:
        self.put_bytes(key, encode_jsonl(rows))

    def upload_file(
        self, key: str, fileobj: IO[bytes], *, content_type: str, bucket: str | None = None
    ) -> None:
        """Upload a (spooled) file from its start, in parts past 8 MiB."""
        fileobj.seek(0)
        with s3_errors(f"uploading {key}"):
            self.client.upload_fileobj(
                fileobj,
                bucket or self.bucket,
                key,
                ExtraArgs={"ContentType": content_type},
                Config=TRANSFER,
            )

    def get_bytes(self, key: str) -> bytes:
        with self.open(key) as obj:
            return obj.read()

    def open(self, key: str, *, bucket: str | None = None, if_match: str | None = None) -> S3Object:
        """Open an object for reading (only the version with this ETag, given `if_match`)."""
        params: dict[str, Any] = {"Bucket": bucket or self.bucket, "Key": key}
        if if_match is not None:
            params["IfMatch"] = f'"{if_match}"'
        with s3_errors(f"reading {key}"):
            return S3Object(self.client.get_object(**params), key)

    def iter_jsonl(self, key: str) -> Iterator[dict[str, Any]]:
        with self.open(key) as obj:
            for line in obj.lines():
                if line:
                    yield json.loads(line)

    def list_page(
        self,
        prefix: str,
        *,
        bucket: str | None = None,
        start_after: str = "",
        token: str = "",
        max_keys: int = 1000,
    ) -> tuple[list[Listed], str]:
        """One page of a listing, and the token of the next ("" at the end)."""
        params: dict[str, Any] = {"Bucket": bucket or self.bucket, "Prefix": prefix}
        if start_after:
            params["StartAfter"] = start_after
        if token:
            params["ContinuationToken"] = token
        with s3_errors(f"listing {prefix}"):
            page = self.client.list_objects_v2(**params, MaxKeys=max_keys)
        listed = [
            Listed(item["Key"], item["ETag"], item["Size"], item["LastModified"])
            for item in page.get("Contents", [])
        ]
        return listed, page.get("NextContinuationToken", "") if page.get("IsTruncated") else ""

    def copy(
        self, key: str, dest: str, *, bucket: str | None = None, if_match: str, size: int
    ) -> None:
        """Copy exactly the version of `key` with this ETag to `dest` (in parts past 5 GiB)."""
        bucket = bucket or self.bucket
        source: CopySourceTypeDef = {"Bucket": bucket, "Key": key}
        with s3_errors(f"copying {key}"):
            if size < COPY_LIMIT:
                self.client.copy_object(
                    Bucket=bucket, Key=dest, CopySource=source, CopySourceIfMatch=f'"{if_match}"'
                )
            else:
                self.client.copy(
                    source, bucket, dest, ExtraArgs={"CopySourceIfMatch": f'"{if_match}"'}
                )

    def delete(self, key: str, *, bucket: str | None = None, if_match: str | None = None) -> None:
        """Delete an object (only the version with this ETag, given `if_match`)."""
        params: dict[str, Any] = {"Bucket": bucket or self.bucket, "Key": key}
        if if_match is not None:
            params["IfMatch"] = f'"{if_match}"'
        with s3_errors(f"deleting {key}"):
            self.client.delete_object(**params)

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under `prefix`, a listing page (1,000 keys) at a time; returns
        how many were deleted."""
        deleted = 0
        with s3_errors(f"deleting {prefix}"):
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
                if keys:
                    self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys})  # type: ignore[typeddict-item]
                    deleted += len(keys)
        return deleted


def encode_jsonl(rows: Iterable[dict[str, Any]]) -> bytes:
    """Deterministic JSONL: the same rows always give the same bytes (rerun-safe S3 objects)."""
    return b"".join(
        json.dumps(row, ensure_ascii=False, separators=(",", ":")).encode() + b"\n" for row in rows
    )
