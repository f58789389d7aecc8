"""Shard writes of a job on its way in: each full shard goes to S3 on a background thread while
reading goes on, at most a few in memory; a failed submission deletes what it wrote."""

from __future__ import annotations

import collections
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from postroom.keys import input_shard_key
from postroom.storage import Storage, encode_jsonl


class ShardWriter:
    """Takes full shards from Intake and writes them to S3 on background threads, so reading the
    next lines overlaps the writes. At most `in_flight` shards wait in memory: a caller that sees
    `backlogged` calls `drain()` (blocking), and `flush()` once at the end, which raises the first
    write error."""

    def __init__(self, storage: Storage, job_id: uuid.UUID, *, in_flight: int = 4) -> None:
        self.storage = storage
        self.job_id = job_id
        self.in_flight = in_flight
        self.written = 0
        self._futures: collections.deque[Future[None]] = collections.deque()
        self._pool: ThreadPoolExecutor | None = None

    def __call__(self, shard_no: int, docs: list[dict[str, Any]]) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="shard-writer")
        self._futures.append(self._pool.submit(self._put, shard_no, docs))

    @property
    def backlogged(self) -> bool:
        return len(self._futures) >= self.in_flight

    def drain(self, keep: int | None = None) -> None:
        """Wait until at most `keep` writes (default: in_flight - 1) are still in flight."""
        keep = self.in_flight - 1 if keep is None else keep
        while len(self._futures) > keep:
            self._futures.popleft().result()
            self.written += 1

    def flush(self) -> None:
        """Wait for every write; raises the first that failed."""
        try:
            self.drain(0)
        finally:
            self._close()

    def discard(self) -> None:
        """Wait for the writes in flight (ignoring their errors) and delete what was written."""
        wrote = self.written > 0
        while self._futures:
            future = self._futures.popleft()
            wrote = wrote or (future.exception() is None)
        self._close()
        if wrote:
            self.storage.delete_prefix(f"inputs/{self.job_id}/")

    def _put(self, shard_no: int, docs: list[dict[str, Any]]) -> None:
        self.storage.put_bytes(input_shard_key(self.job_id, shard_no), encode_jsonl(docs))

    def _close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
