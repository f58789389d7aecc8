"""The gauges the API computes from Postgres at scrape time, shared with GET /v1/status.

Postgres is the record: queue depth is counted from shard rows, not from Redis.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from prometheus_client.core import Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from postroom.db.models import Job, Shard, Worker
from postroom.domain import JOB_ACTIVE, SHARD_CLAIMABLE, ShardState
from postroom.metrics import labelled_families
from postroom.queue import QUEUE_SPILL, gpu_queue
from postroom.settings import Settings

logger = logging.getLogger(__name__)


@dataclass
class QueueDepth:
    queue: str
    shards: int = 0
    documents: int = 0
    running_shards: int = 0
    running_documents: int = 0
    workers: int = 0  # live workers that serve this queue


def queue_workers(*, session: Session, since: datetime) -> dict[str, int]:
    """Workers with a heartbeat after `since` per queue they serve (a GPU worker serves its
    models' queues, a spill worker the spill queue)."""
    counts: dict[str, int] = {}
    for route, models in session.execute(
        select(Worker.route, Worker.models).where(Worker.heartbeat_at >= since)
    ).all():
        for queue in [QUEUE_SPILL] if route == "spill" else [gpu_queue(a) for a in models or []]:
            counts[queue] = counts.get(queue, 0) + 1
    return counts


def shard_queues(settings: Settings) -> list[str]:
    """Every queue shards can wait in: one per model alias, and spill."""
    return [*(gpu_queue(alias) for alias in settings.models), QUEUE_SPILL]


def queue_depths(
    *, session: Session, queues: Iterable[str] = (), alive_since: datetime | None = None
) -> list[QueueDepth]:
    """Shards (and their documents) waiting (queued or expired) and running, per queue, and the
    live workers serving each (heartbeat after `alive_since`).

    `queues` are always listed, at 0 when empty, so a depth falls to 0 instead of vanishing.
    """
    depths = {queue: QueueDepth(queue) for queue in queues}
    rows = session.execute(
        select(Shard.queue, Shard.state, func.count(), func.coalesce(func.sum(Shard.doc_count), 0))
        .where(Shard.state.in_([*SHARD_CLAIMABLE, ShardState.running]))
        .group_by(Shard.queue, Shard.state)
    ).all()
    for queue, state, shards, docs in rows:
        depth = depths.setdefault(queue, QueueDepth(queue))
        if state == ShardState.running:
            depth.running_shards += int(shards)
            depth.running_documents += int(docs)
        else:
            depth.shards += int(shards)
            depth.documents += int(docs)
    if alive_since is not None:
        for queue, count in queue_workers(session=session, since=alive_since).items():
            if queue in depths:
                depths[queue].workers = count
    return sorted(depths.values(), key=lambda d: d.queue)


def documents_by_route(*, session: Session, since: datetime) -> dict[str, int]:
    """Documents of shards finished since `since`, by route (spill over total = spill ratio)."""
    rows = session.execute(
        select(Shard.route, func.sum(Shard.doc_count))
        .where(Shard.state == ShardState.done, Shard.finished_at >= since)
        .group_by(Shard.route)
    ).all()
    return {str(route): int(docs) for route, docs in rows if route}


def spill_ratio(by_route: dict[str, int]) -> float:
    total = sum(by_route.values())
    spilled = by_route.get("spill", 0) + by_route.get("batch", 0)
    return spilled / total if total else 0.0


def alive_workers(*, session: Session, since: datetime) -> dict[str, int]:
    """Workers whose last heartbeat is after `since`, by route."""
    rows = session.execute(
        select(Worker.route, func.count())
        .where(Worker.heartbeat_at >= since)
        .group_by(Worker.route)
    ).all()
    return {str(route): int(count) for route, count in rows}


def active_jobs(*, session: Session) -> dict[str, int]:
    rows = session.execute(
        select(Job.status, func.count()).where(Job.status.in_(JOB_ACTIVE)).group_by(Job.status)
    ).all()
    counts = {str(status): 0 for status in JOB_ACTIVE}
    counts.update({str(status): int(count) for status, count in rows})
    return counts


SPILL_WINDOW_SECONDS = 300.0

_POSTGRES_SPECS = [
    ("gauge", "postroom_queue_depth_shards", "Shards waiting (queued, expired)", ["queue"]),
    ("gauge", "postroom_queue_depth_documents", "Documents of waiting shards", ["queue"]),
    ("gauge", "postroom_queue_running_shards", "Shards being worked", ["queue"]),
    ("gauge", "postroom_queue_running_documents", "Documents of shards being worked", ["queue"]),
    ("gauge", "postroom_queue_workers", "Live workers serving the queue", ["queue"]),
    (
        "gauge",
        "postroom_queue_unserved_documents",
        "Documents waiting in a queue no live worker serves (what a scale-from-zero reads)",
        ["queue"],
    ),
    ("gauge", "postroom_jobs", "Jobs not finished, by status", ["status"]),
    ("gauge", "postroom_workers_alive", "Workers with a recent heartbeat, by route", ["route"]),
    (
        "gauge",
        "postroom_spill_ratio",
        f"Share of documents finished on the spill route in the last {SPILL_WINDOW_SECONDS:.0f}s",
        [],
    ),
    ("gauge", "postroom_postgres_up", "1 when the last scrape could read Postgres", []),
]


class PostgresCollector(Collector):
    """Deployment-wide gauges counted from Postgres at scrape time (served by the API)."""

    def __init__(
        self, sessions: sessionmaker[Session] | None = None, settings: Settings | None = None
    ) -> None:
        self.sessions = sessions
        self.settings = settings

    def describe(self) -> Iterable[Metric]:
        return list(labelled_families(_POSTGRES_SPECS).values())

    def collect(self) -> Iterator[Metric]:
        families = labelled_families(_POSTGRES_SPECS)
        up = families["postroom_postgres_up"]
        if self.sessions is None or self.settings is None:
            yield from families.values()
            return
        now = datetime.now(UTC)
        try:
            with self.sessions() as session:
                depths = queue_depths(
                    session=session,
                    queues=shard_queues(self.settings),
                    alive_since=now - timedelta(seconds=self.settings.gpu_dead_after),
                )
                jobs = active_jobs(session=session)
                alive = alive_workers(
                    session=session, since=now - timedelta(seconds=self.settings.gpu_dead_after)
                )
                by_route = documents_by_route(
                    session=session, since=now - timedelta(seconds=SPILL_WINDOW_SECONDS)
                )
        except SQLAlchemyError as e:
            logger.warning("metrics: cannot read Postgres: %s", e)
            up.add_metric([], 0)
            yield up
            return
        for depth in depths:
            for name, value in (
                ("postroom_queue_depth_shards", depth.shards),
                ("postroom_queue_depth_documents", depth.documents),
                ("postroom_queue_running_shards", depth.running_shards),
                ("postroom_queue_running_documents", depth.running_documents),
                ("postroom_queue_workers", depth.workers),
                ("postroom_queue_unserved_documents", 0 if depth.workers else depth.documents),
            ):
                families[name].add_metric([depth.queue], value)
        for status, count in jobs.items():
            families["postroom_jobs"].add_metric([status], count)
        for route in sorted({"gpu", "spill", *alive}):
            families["postroom_workers_alive"].add_metric([route], alive.get(route, 0))
        families["postroom_spill_ratio"].add_metric([], spill_ratio(by_route))
        up.add_metric([], 1)
        yield from families.values()
