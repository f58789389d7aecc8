"""Shard writes of a job on its way in: each full shard goes to S3 on a background thread while
reading goes on, at most a few in memory; a failed submission deletes what it wrote."""

from __future__ import annotations

import collections
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from postroom.keys import input_shard_key
from postroom.storage import Storage, encode_jsonl


class ShardWriter:
    """Takes full shards from Intake and writes them to S3 on background threads, so reading the
    next lines overlaps the writes. At most `in_flight` shards wait in memory: a caller that sees
    `backlogged` calls `drain()` (blocking), and `flush()` once at the end, which raises the first
    write error."""

    def __init__(
        self,
        storage: Storage,
        job_id: uuid.UUID,
        *,
        in_flight: int = 4,
        on_landed: Callable[[], object] | None = None,
    ) -> None:
        self.storage = storage
        self.job_id = job_id
        self.in_flight = in_flight
        self.written = 0
        # Shards 0 … landed - 1 are all in S3 (some later ones may be too); `on_landed` is called
        # on the writing thread after each write (its error fails that write, raised by flush).
        self.landed = 0
        self.sizes: list[int] = []  # documents per shard, by shard number
        self.on_landed = on_landed
        self._lock = threading.Lock()
        self._out_of_order: set[int] = set()
        self._futures: collections.deque[Future[None]] = collections.deque()
        self._pool: ThreadPoolExecutor | None = None

    def __call__(self, shard_no: int, docs: list[dict[str, Any]]) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="shard-writer")
        self.sizes.append(len(docs))
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
        with self._lock:
            self._out_of_order.add(shard_no)
            while self.landed in self._out_of_order:
                self._out_of_order.discard(self.landed)
                self.landed += 1
        if self.on_landed is not None:
            self.on_landed()

    def _close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
