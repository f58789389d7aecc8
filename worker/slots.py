"""Fair admission into the engine: a counting semaphore that shares its slots across shards.

A plain FIFO semaphore lets the first shard's documents take every slot, so shards enter the engine
one after another. Granting each free slot to the waiting shard that holds the fewest keeps every
shard in flight moving at once (continuous batching mixes them) while a lone shard still gets all
the slots.
"""

from __future__ import annotations

import asyncio
import collections


class FairSlots:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self.held: collections.Counter[str] = collections.Counter()
        self._waiters: dict[str, collections.deque[asyncio.Future[None]]] = {}

    async def acquire(self, key: str) -> None:
        if self.used < self.capacity and not self._waiters:
            self._take(key)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(key, collections.deque()).append(future)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release(key)  # granted just as we were cancelled: hand the slot on
            else:
                self._forget(key, future)
            raise

    def release(self, key: str) -> None:
        self.used -= 1
        self.held[key] -= 1
        if self.held[key] <= 0:
            del self.held[key]
        self._grant()

    def _take(self, key: str) -> None:
        self.used += 1
        self.held[key] += 1

    def _grant(self) -> None:
        while self.used < self.capacity and self._waiters:
            key = min(self._waiters, key=lambda k: self.held.get(k, 0))
            queue = self._waiters[key]
            future = queue.popleft()
            if not queue:
                del self._waiters[key]
            if future.done():
                continue
            self._take(key)
            future.set_result(None)

    def _forget(self, key: str, future: asyncio.Future[None]) -> None:
        queue = self._waiters.get(key)
        if queue is not None and future in queue:
            queue.remove(future)
            if not queue:
                del self._waiters[key]
