"""Shard numbers: a split shard's parts and the bound an early-started job takes as its
`shard_count`. Pure arithmetic, no database."""

from __future__ import annotations

# Child shard numbers start at a job's `shard_count` (child_shard_nos), so a job that runs
# shards while its upload still streams (postroom.early_start) cannot know it: such a job takes
# this bound as its `shard_count` from the start (an upload has fewer root shards: see
# early_start_fits).
EARLY_SHARD_BASE = 2**21
INT32_MAX = 2**31 - 1


def early_start_fits(*, shard_size: int, fanout: int) -> bool:
    """Whether the numbers of the deepest split parts of an early job fit the int column: each
    level of splitting multiplies the largest number by about fanout + 1, down to one document."""
    depth, size = 0, shard_size
    while size > 1:
        size = -(-size // fanout)
        depth += 1
    return bool(EARLY_SHARD_BASE * (fanout + 1) ** depth < INT32_MAX)


def child_shard_nos(shard_no: int, *, shard_count: int, fanout: int, parts: int) -> list[int]:
    """The numbers of a split shard's parts: `shard_count + fanout * n + j` for j < parts.

    A deterministic function of the parent, so a repeated split makes the same children and two
    shards splitting at once never collide (roots are < shard_count, children >= it, and
    f*a + j = f*b + i with i, j < f forces a = b, i = j).
    """
    if parts > fanout:
        raise ValueError("more parts than the fanout")
    first = shard_count + fanout * shard_no
    return [first + j for j in range(parts)]
