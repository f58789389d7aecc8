"""/v1/status: the caller's jobs and the deployment's queues, workers and spill, in one snapshot
(what `postroom status` shows). Everything is read from Postgres, the record. Every tenant sees
the queues and how many workers are alive per route (what its ETA depends on); only admin keys
see the workers themselves (host names, pids, engine stats)."""

from __future__ import annotations

import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field
from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from api.deps import CallerDep, SessionDep, SettingsDep
from api.job_view import job_public
from api.routes.jobs import ERRORS
from api.schemas import JobPublic
from postroom.db.models import Job, Shard, Worker
from postroom.domain import JOB_ACTIVE, ShardState
from postroom.postgres_metrics import documents_by_route, queue_depths, shard_queues, spill_ratio

router = APIRouter(prefix="/v1/status", tags=["status"])

# Workers silent for longer than this are left out (their rows stay in Postgres).
WORKERS_SEEN_SECONDS = 600.0
# A worker's docs/s: documents of the shards it finished over this window.
WORKER_RATE_SECONDS = 60.0
MAX_JOBS = 50


class QueueStatus(BaseModel):
    queue: str
    shards: int = Field(description="shards waiting (queued or expired)")
    documents: int = Field(description="documents of the waiting shards")
    running_shards: int
    running_documents: int
    workers: int = Field(description="live workers serving this queue; 0 with work = waiting")


class WorkerStatus(BaseModel):
    name: str
    route: str
    models: list[str]
    alive: bool = Field(description="heartbeat within POSTROOM_GPU_DEAD_AFTER seconds")
    heartbeat_age_seconds: float
    started_at: datetime
    shards_in_flight: int
    docs_done: int
    docs_per_second: float = Field(description=f"over the last {WORKER_RATE_SECONDS:.0f}s")
    engines: dict[str, Any] = Field(default_factory=dict, description="engine stats per alias")


class SpillStatus(BaseModel):
    window_seconds: float
    documents: dict[str, int] = Field(description="documents finished per route in the window")
    ratio: float = Field(description="spill's share of the documents finished in the window")


class StatusPublic(BaseModel):
    generated_at: datetime
    queues: list[QueueStatus]
    workers_alive: dict[str, int] = Field(description="workers with a recent heartbeat, by route")
    workers: list[WorkerStatus] = Field(description="every worker; admin keys only, else empty")
    jobs: list[JobPublic] = Field(
        description="the caller's unfinished jobs and those finished within `recent` seconds"
    )
    spill: SpillStatus


def worker_statuses(*, session: Session, now: datetime, dead_after: float) -> list[WorkerStatus]:
    rows = session.scalars(
        select(Worker)
        .where(Worker.heartbeat_at >= now - timedelta(seconds=WORKERS_SEEN_SECONDS))
        .order_by(Worker.route, Worker.name)
    ).all()
    done = dict(
        session.execute(
            select(Shard.worker, func.sum(Shard.doc_count))
            .where(
                Shard.state == ShardState.done,
                Shard.finished_at >= now - timedelta(seconds=WORKER_RATE_SECONDS),
                Shard.worker.in_([w.name for w in rows]),
            )
            .group_by(Shard.worker)
        ).all()
    )
    out = []
    for w in rows:
        age = max(0.0, (now - w.heartbeat_at).total_seconds())
        stats = w.stats or {}
        out.append(
            WorkerStatus(
                name=w.name,
                route=w.route,
                models=list(w.models or []),
                alive=age <= dead_after,
                heartbeat_age_seconds=round(age, 1),
                started_at=w.started_at,
                shards_in_flight=int(stats.get("shards_in_flight", 0)),
                docs_done=w.docs_done,
                docs_per_second=round(int(done.get(w.name) or 0) / WORKER_RATE_SECONDS, 2),
                engines=stats.get("engines") or {},
            )
        )
    return out


def tenant_jobs(*, session: Session, tenant_id: uuid.UUID, since: datetime) -> list[Job]:
    return list(
        session.scalars(
            select(Job)
            .where(
                Job.tenant_id == tenant_id,
                Job.deleted_at.is_(None),
                or_(Job.status.in_(JOB_ACTIVE), Job.finished_at >= since),
            )
            .order_by(Job.created_at.desc())
            .limit(MAX_JOBS)
        ).all()
    )


@router.get("", responses=ERRORS)
def get_status(
    caller: CallerDep,
    session: SessionDep,
    settings: SettingsDep,
    recent: Annotated[
        float, Query(gt=0, le=86_400, description="also list jobs finished this many seconds ago")
    ] = 600.0,
    window: Annotated[
        float, Query(gt=0, le=86_400, description="seconds of the spill window")
    ] = 300.0,
) -> StatusPublic:
    """The caller's jobs (progress, rate, ETA) and the deployment's queues, workers and spill."""
    now = datetime.now(UTC)
    workers = worker_statuses(session=session, now=now, dead_after=settings.gpu_dead_after)
    by_route = documents_by_route(session=session, since=now - timedelta(seconds=window))
    jobs = tenant_jobs(
        session=session, tenant_id=caller.tenant_id, since=now - timedelta(seconds=recent)
    )
    return StatusPublic(
        generated_at=now,
        queues=[
            QueueStatus(**depth.__dict__)
            for depth in queue_depths(
                session=session,
                queues=shard_queues(settings),
                alive_since=now - timedelta(seconds=settings.gpu_dead_after),
            )
        ],
        workers_alive=dict(sorted(Counter(w.route for w in workers if w.alive).items())),
        workers=workers if caller.is_admin else [],
        jobs=[job_public(session=session, job=job, settings=settings) for job in jobs],
        spill=SpillStatus(window_seconds=window, documents=by_route, ratio=spill_ratio(by_route)),
    )
