"""Deterministic ids, hashes and S3 keys. Every S3 key Postroom writes is built here."""

from __future__ import annotations

import hashlib
import secrets
from uuid import UUID

API_KEY_PREFIX = "pr"


def input_shard_key(job_id: UUID, shard_no: int) -> str:
    return f"inputs/{job_id}/shard-{shard_no:06d}.jsonl"


def result_shard_key(job_id: UUID, shard_no: int) -> str:
    return f"results/{job_id}/shard-{shard_no:06d}.jsonl"


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
