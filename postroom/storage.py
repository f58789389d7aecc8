"""S3 through boto3: shard objects in and out, read line by line. Keys come from postroom.keys."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from postroom.errors import Unavailable
from postroom.settings import Settings

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client


class Storage:
    """One S3 client and bucket. Thread-safe (boto3 clients are)."""

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
        self, key: str, body: bytes, *, content_type: str = "application/x-ndjson"
    ) -> None:
        self.client.put_object(Bucket=self.bucket, Key=key, Body=body, ContentType=content_type)

    def put_jsonl(self, key: str, rows: Iterable[dict[str, Any]]) -> None:
        self.put_bytes(key, encode_jsonl(rows))

    def get_bytes(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()

    def iter_jsonl(self, key: str) -> Iterator[dict[str, Any]]:
        body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
        for line in body.iter_lines():
            if line:
                yield json.loads(line)

    def delete_prefix(self, prefix: str) -> None:
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
            keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
            if keys:
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys})  # type: ignore[typeddict-item]


def encode_jsonl(rows: Iterable[dict[str, Any]]) -> bytes:
    """Deterministic JSONL: the same rows always give the same bytes (rerun-safe S3 objects)."""
    return b"".join(
        json.dumps(row, ensure_ascii=False, separators=(",", ":")).encode() + b"\n" for row in rows
    )
