"""The router's arithmetic, pure (no database, no broker): which shards of a deadline job spill,
and which spilled shards come back to the GPUs. `control.router` applies them each tick."""

from __future__ import annotations

import uuid
from dataclasses import dataclass


@dataclass(frozen=True)
class Spilled:
    """An unclaimed shard in the spill queue; `home` is the GPU queue it may go back to (None: it
    stays, because its job is `always` or its GPUs are down)."""

    job_id: uuid.UUID
    shard_no: int
    docs: int
    home: str | None


def plan_deadline(
    unclaimed: list[tuple[int, int]],
    *,
    ahead: int,
    rate: float,
    seconds_left: float,
    spill_ahead: int = 0,
    spill_rate: float | None = None,
    margin: float = 1.0,
) -> tuple[list[int], int]:
    """Choose which shards of one job spill; return (shards to spill, docs kept on the GPUs).

    `unclaimed` is (shard_no, docs) in queue order. `ahead` documents are before them on the GPUs,
    which drain `rate` docs/s; `spill_ahead` documents wait or run on the spill route, which drains
    `spill_rate` docs/s (None: not measured yet, so spill counts as instant). A shard the GPUs
    finish before the deadline stays; one they do not spills if spill finishes it before the
    deadline, or (a deadline lost either way) `margin` times sooner than the GPUs. Either way
    the GPUs would not finish it sooner than spill, let alone `margin` times sooner, so
    `plan_take_back` leaves it there.
    """
    kept = spilled = 0
    to_spill: list[int] = []
    for shard_no, docs in unclaimed:
        gpu_finish = (ahead + kept + docs) / rate
        spill_finish = 0.0 if spill_rate is None else (spill_ahead + spilled + docs) / spill_rate
        if gpu_finish > seconds_left and (
            spill_finish <= seconds_left or spill_finish * margin < gpu_finish
        ):
            to_spill.append(shard_no)
            spilled += docs
        else:
            kept += docs
    return to_spill, kept


def misses_deadline(
    *,
    kept: int,
    spilled: int,
    ahead: int,
    rate: float,
    seconds_left: float,
    spill_ahead: int = 0,
    spill_rate: float | None = None,
) -> bool:
    """Whether a job misses its deadline even split as `plan_deadline` split it: the `kept`
    documents finish on the GPUs after `ahead`, the `spilled` ones on spill after `spill_ahead`
    (instant while spill is not measured), and the later of the two is past `seconds_left`."""
    gpu_end = (ahead + kept) / rate if kept else 0.0
    spill_end = (spill_ahead + spilled) / spill_rate if spilled and spill_rate else 0.0
    return max(gpu_end, spill_end) > seconds_left


def plan_take_back(
    backlog: list[Spilled],
    *,
    running: int,
    spill_rate: float | None,
    ahead: dict[str, int],
    rates: dict[str, float],
    margin: float,
    spill_down: bool = False,
) -> list[Spilled]:
    """Choose the spilled shards the GPUs would finish `margin` times sooner than spill would.

    While spill is down (`spill_down`: no live spill worker, or all their breakers open) every
    shard with a home goes back: spill would never finish them.

    `backlog` is the spill queue's unclaimed shards in the order spill workers take them, behind
    `running` documents being worked there; `ahead` documents wait or run on each GPU queue, which
    drains `rates` docs/s. Shards come back from the end of the backlog (the last that spill would
    reach): a shard's spill finish is the documents up to and including it over `spill_rate`, and
    its GPU finish counts the shards already taken back before it. Before spill is measured,
    nothing comes back that way. An idle live GPU queue with no measured rate (it has done nothing
    for a whole window, e.g. it is back from an outage) gets the last shard meant for it: that
    measures its rate for the next ticks.
    """
    if spill_down:
        return [shard for shard in reversed(backlog) if shard.home]
    ahead = dict(ahead)
    back: list[Spilled] = []
    for shard in reversed(backlog):
        if shard.home and not rates.get(shard.home) and not ahead.get(shard.home):
            back.append(shard)
            ahead[shard.home] = shard.docs
    if not spill_rate:
        return back
    position = running + sum(shard.docs for shard in backlog)
    for shard in reversed(backlog):
        rate = rates.get(shard.home) if shard.home else None
        if shard.home and rate:
            gpu_finish = (ahead.get(shard.home, 0) + shard.docs) / rate
            if gpu_finish * margin < position / spill_rate:
                back.append(shard)
                ahead[shard.home] = ahead.get(shard.home, 0) + shard.docs
        # Taking a shard back leaves the positions of the shards before it as they were.
        position -= shard.docs
    return back
