"""Deterministic ids, hashes and S3 keys. Every S3 key Postroom writes is built here."""

from __future__ import annotations

import hashlib
import secrets
from uuid import NAMESPACE_URL, UUID, uuid4, uuid5

API_KEY_PREFIX = "pr"


def input_shard_key(job_id: UUID, shard_no: int) -> str:
    return f"inputs/{job_id}/shard-{shard_no:06d}.jsonl"


def result_shard_key(job_id: UUID, shard_no: int) -> str:
    return f"results/{job_id}/shard-{shard_no:06d}.jsonl"


def results_parquet_key(job_id: UUID) -> str:
    """The whole job's results as Parquet, next to the shard files, once the job completed."""
    return f"results/{job_id}/results.parquet"


def job_prefixes(job_id: UUID) -> tuple[str, ...]:
    """Every key prefix under which Postroom keeps objects of one job (deletion lists these)."""
    return (f"inputs/{job_id}/", f"results/{job_id}/", f"batches/{job_id}/")


def rejected_lines_key(job_id: UUID) -> str:
    """Lines refused at submission under `on_invalid=skip` (they are also failed result rows)."""
    return f"results/{job_id}/rejected.jsonl"


def body_hash(*parts: bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()


def new_api_key() -> tuple[str, str, str]:
    """A fresh API key: (the key shown once, its public prefix, its stored hash).

    256 bits of randomness, so a plain SHA-256 is the right hash (no need for a slow KDF: nothing
    to brute-force).
    """
    prefix = secrets.token_hex(4)
    key = f"{API_KEY_PREFIX}_{prefix}_{secrets.token_urlsafe(32)}"
    return key, prefix, hash_api_key(key)


def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


# -- S3 drop folder: <prefix>/inbox/<name>/<file> → outbox/, done/, failed/ next to it


def drop_root(prefix: str) -> str:
    """`<prefix>/` of the drop folder (POSTROOM_INBOX_PREFIX), or "" for the bucket root."""
    cleaned = prefix.strip("/")
    return f"{cleaned}/" if cleaned else ""


def drop_area(prefix: str, area: str) -> str:
    """The key prefix of one drop-folder area: `inbox/`, `outbox/`, `done/` or `failed/`."""
    return f"{drop_root(prefix)}{area}/"


def drop_key(prefix: str, area: str, name: str, file: str) -> str:
    """`<prefix>/<area>/<name>/<file>`; a file dropped outside any folder has no `<name>/`."""
    return f"{drop_area(prefix, area)}{name + '/' if name else ''}{file}"


def inbox_job_file_key(prefix: str, name: str) -> str:
    return drop_key(prefix, "inbox", name, "job.json")


def outbox_results_key(prefix: str, name: str, file: str) -> str:
    return drop_key(prefix, "outbox", name, f"{file}.results.jsonl")


def outbox_parquet_key(prefix: str, name: str, file: str) -> str:
    return drop_key(prefix, "outbox", name, f"{file}.results.parquet")


def outbox_errors_key(prefix: str, name: str, file: str) -> str:
    return drop_key(prefix, "outbox", name, f"{file}.errors.jsonl")


def done_key(prefix: str, name: str, file: str) -> str:
    return drop_key(prefix, "done", name, file)


def failed_key(prefix: str, name: str, file: str) -> str:
    return drop_key(prefix, "failed", name, file)


def failed_reason_key(prefix: str, name: str, file: str) -> str:
    return drop_key(prefix, "failed", name, f"{file}.reason.txt")


def inbox_object_id(bucket: str, key: str, etag: str) -> UUID:
    """The id of one object version in the inbox, which is also the id of its job: the same
    (bucket, key, ETag) always gives the same id, so a retried ingest cannot make a second job."""
    return uuid5(NAMESPACE_URL, f"s3://{bucket}/{key}#etag={etag}")


# -- OpenAI batches and files: ids and keys derived from the batch id (a rerun rewrites)


def new_file_id() -> str:
    return f"file-{uuid4().hex}"


def batch_public_id(batch_id: UUID) -> str:
    return f"batch_{batch_id.hex}"


def output_file_id(batch_id: UUID) -> str:
    return f"file-{batch_id.hex}-output"


def error_file_id(batch_id: UUID) -> str:
    return f"file-{batch_id.hex}-errors"


def file_key(file_id: str) -> str:
    return f"files/{file_id}.jsonl"


def invalid_lines_key(batch_id: UUID) -> str:
    """Error lines of the requests refused at creation; the error file starts with them."""
    return f"batches/{batch_id}/invalid-lines.jsonl"


def _digest(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:32]


def request_line_id(batch_id: UUID, key: str) -> str:
    return f"batch_req_{_digest(str(batch_id), key)}"
