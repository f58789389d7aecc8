"""Jobs and shards: label checks, model choice, creation, claims, leases, finish and cancel.

Every state change is a compare-and-set UPDATE. Functions take the session and never commit: the
caller (a route or a task body) owns the transaction.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from celery import Celery
from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from postroom.db.models import Job, Result, Shard, Worker
from postroom.domain import (
    JOB_ACTIVE,
    SHARD_CLAIMABLE,
    SHARD_FINISHED,
    JobSpec,
    JobStatus,
    Label,
    Mode,
    ShardState,
)
from postroom.errors import InvalidLabels, NotFound, UnknownModel
from postroom.intake import Rejected
from postroom.queue import QUEUE_SPILL, publish_shard
from postroom.settings import ModelSpec, Settings

logger = logging.getLogger(__name__)

_SPACES = re.compile(r"\s+")


def normalise_label(name: str) -> str:
    """The form two label names are compared in: case- and whitespace-insensitive."""
    return _SPACES.sub(" ", name).strip().casefold()


def validate_labels(raw: Sequence[str | Label], *, settings: Settings) -> list[Label]:
    """Check a label set; raise InvalidLabels naming every problem."""
    labels = [Label(name=item) if isinstance(item, str) else item for item in raw]
    problems: list[dict[str, Any]] = []
    if len(labels) < settings.min_labels:
        problems.append(
            {
                "field": "labels",
                "reason": f"{len(labels)} label(s) given; a job needs at least "
                f"{settings.min_labels} (POSTROOM_MIN_LABELS)",
            }
        )
    if len(labels) > settings.max_labels:
        problems.append(
            {
                "field": "labels",
                "reason": f"{len(labels)} labels given; at most {settings.max_labels} are allowed "
                "(POSTROOM_MAX_LABELS)",
            }
        )
    seen: dict[str, int] = {}
    for index, label in enumerate(labels):
        where = f"labels[{index}]"
        name = label.name.strip()
        if not name:
            problems.append({"field": f"{where}.name", "reason": "empty label name"})
            continue
        if len(name) > settings.max_label_length:
            problems.append(
                {
                    "field": f"{where}.name",
                    "reason": f"label name is {len(name)} characters; the limit is "
                    f"{settings.max_label_length} (POSTROOM_MAX_LABEL_LENGTH)",
                }
            )
        if label.description and len(label.description) > settings.max_description_length:
            problems.append(
                {
                    "field": f"{where}.description",
                    "reason": f"description is over {settings.max_description_length} characters "
                    "(POSTROOM_MAX_DESCRIPTION_LENGTH)",
                }
            )
        key = normalise_label(name)
        if key in seen:
            problems.append(
                {
                    "field": f"{where}.name",
                    "reason": f"duplicate of labels[{seen[key]}] ({labels[seen[key]].name!r}); "
                    "names must differ ignoring case and spaces",
                }
            )
        else:
            seen[key] = index
    if problems:
        raise InvalidLabels(
            f"the label set is invalid: {problems[0]['reason']}",
            details=problems[: settings.max_error_details],
        )
    return [Label(name=label.name.strip(), description=label.description) for label in labels]


def served_models(*, session: Session, settings: Settings) -> list[str]:
    """Registry aliases that some worker registered within `worker_registration_ttl` seconds.

    A spill worker serves every alias (through the managed API), so with one registered and a
    spill endpoint configured no job is refused for want of a GPU worker.
    """
    since = datetime.now(UTC) - timedelta(seconds=settings.worker_registration_ttl)
    rows = session.execute(
        select(Worker.route, Worker.models).where(Worker.heartbeat_at >= since)
    ).all()
    served = {alias for _, models in rows for alias in models}
    if settings.spill_base_url and any(route == "spill" for route, _ in rows):
        served |= set(settings.models)
    return sorted(alias for alias in served if alias in settings.models)


def choose_model(
    *, session: Session, settings: Settings, alias: str | None, mode: Mode | None
) -> tuple[str, ModelSpec]:
    """Resolve the job's model alias; refuse unknown or unserved aliases and mode mismatches."""
    served = served_models(session=session, settings=settings)
    if alias is None:
        candidates = [settings.model] if mode is None else []
        if mode is not None:
            ordered = [settings.model, *served]
            candidates = [a for a in ordered if settings.models[a].mode == mode][:1]
        alias = candidates[0] if candidates else None
        if alias is None:
            raise UnknownModel(
                f"no served model does mode {mode!r}; served: {', '.join(served) or 'none'}",
                details=[{"field": "mode", "served": served}],
            )
    if alias not in settings.models or alias not in served:
        raise UnknownModel(
            f"model {alias!r} is not served by any worker; use one of: "
            f"{', '.join(served) or 'none (start a worker: postroom worker --models ALIAS)'}",
            details=[{"field": "model", "served": served}],
        )
    spec = settings.models[alias]
    if mode is not None and spec.mode != mode:
        raise UnknownModel(
            f"model {alias!r} is a {spec.mode} model but the job asks for mode {mode!r}",
            details=[{"field": "mode", "served": served}],
        )
    return alias, spec


@dataclass(frozen=True)
class NewJob:
    """What a route has validated and written to S3, ready to become rows."""

    job_id: uuid.UUID
    tenant_id: uuid.UUID
    spec: JobSpec
    spill: str
    deadline: datetime | None
    metadata: dict[str, Any] | None
    idempotency_key: str | None
    body_hash: str | None
    shard_sizes: Sequence[int]
    rejected: Sequence[Rejected]
    queue: str
    warnings: Sequence[str] = ()
    max_spill_cost: float | None = None
    estimate: dict[str, Any] | None = None


def create_job(*, session: Session, new: NewJob) -> Job:
    """Insert the job, its shards and the failed results of skipped lines (status `queued`)."""
    total = sum(new.shard_sizes) + len(new.rejected)
    job = Job(
        id=new.job_id,
        tenant_id=new.tenant_id,
        status=JobStatus.queued if new.shard_sizes else JobStatus.completed,
        spec=new.spec.model_dump(mode="json"),
        model=new.spec.model,
        spill=new.spill,
        deadline=new.deadline,
        job_metadata=new.metadata,
        warnings=list(new.warnings),
        idempotency_key=new.idempotency_key,
        body_hash=new.body_hash,
        max_spill_cost=new.max_spill_cost,
        estimate=new.estimate,
        total_docs=total,
        rejected_docs=len(new.rejected),
        shard_count=len(new.shard_sizes),
        finished_at=None if new.shard_sizes else func.now(),
    )
    session.add(job)
    session.flush()
    if new.shard_sizes:
        session.execute(
            insert(Shard),
            [
                {
                    "job_id": new.job_id,
                    "shard_no": no,
                    "state": ShardState.queued,
                    "queue": new.queue,
                    "doc_count": size,
                    "attempt": 0,
                }
                for no, size in enumerate(new.shard_sizes)
            ],
        )
    if new.rejected:
        rows = [
            {
                "job_id": new.job_id,
                "doc_id": r.result_id,
                "shard_no": -1,
                "line": r.line,
                "error": f"invalid_document: line {r.line}"
                + (f", field {r.field}" if r.field else "")
                + f": {r.reason}",
                "model": new.spec.model,
                "revision": new.spec.revision,
            }
            for r in new.rejected
        ]
        for start in range(0, len(rows), 1000):
            session.execute(insert(Result), rows[start : start + 1000])
    return job


def find_job(*, session: Session, tenant_id: uuid.UUID | None, job_id: uuid.UUID) -> Job:
    """The job, if it exists and belongs to the tenant (None = any tenant: workers, admins)."""
    job = session.get(Job, job_id)
    if job is None or (tenant_id is not None and job.tenant_id != tenant_id):
        raise NotFound(f"no job {job_id}; check the id (jobs of other tenants are not visible)")
    return job


def publish_job(*, session: Session, celery: Celery, job_id: uuid.UUID) -> int:
    """Publish every queued, never-published shard of a job. Call after the job is committed.

    Postgres is the record: if the broker is down the shards stay queued with no `enqueued_at`, and
    are published again later, so a broker outage delays a job and never loses it.
    """
    shards = session.execute(
        select(Shard.shard_no, Shard.queue).where(
            Shard.job_id == job_id, Shard.state == ShardState.queued, Shard.enqueued_at.is_(None)
        )
    ).all()
    published: list[int] = []
    try:
        for shard_no, queue in shards:
            publish_shard(celery, job_id=str(job_id), shard_no=shard_no, queue=queue)
            published.append(shard_no)
    except Exception as e:  # kombu raises many types here; the shard stays queued in Postgres
        logger.warning("publishing job %s stopped after %d shards: %s", job_id, len(published), e)
    if published:
        session.execute(
            update(Shard)
            .where(Shard.job_id == job_id, Shard.shard_no.in_(published))
            .values(enqueued_at=func.now())
        )
    return len(published)


def claim_shard(
    *,
    session: Session,
    job_id: uuid.UUID,
    shard_no: int,
    worker: str,
    lease_seconds: int,
    route: str = "gpu",
) -> tuple[int, int] | None:
    """Take a shard for work; returns (attempt, crashes) or None.

    `attempt` is the fencing token; `crashes` counts earlier attempts that ended without giving
    the shard back (the worker died or hung), which is what poison isolation looks at.

    A shard can be claimed when it is queued, expired, or running with a lease that ran out (its
    worker died). A duplicate delivery finds it running or done and gets None: a no-op.
    """
    attempt = session.execute(
        update(Shard)
        .where(
            Shard.job_id == job_id,
            Shard.shard_no == shard_no,
            or_(
                Shard.state.in_(SHARD_CLAIMABLE),
                and_(Shard.state == ShardState.running, Shard.lease_until < func.now()),
            ),
            # The router moves shards between routes; a stale message on the other route is a
            # no-op, so a shard is never worked by both.
            (Shard.queue == QUEUE_SPILL) if route == "spill" else (Shard.queue != QUEUE_SPILL),
        )
        .values(
            state=ShardState.running,
            attempt=Shard.attempt + 1,
            lease_until=func.now() + timedelta(seconds=lease_seconds),
            worker=worker,
            started_at=func.now(),
        )
        .returning(Shard.attempt, Shard.releases)
    ).one_or_none()
    if attempt is not None:
        session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == JobStatus.queued)
            .values(status=JobStatus.running, started_at=func.now())
        )
    return None if attempt is None else (attempt[0], attempt[0] - 1 - attempt[1])


def extend_leases(
    *, session: Session, leases: Sequence[tuple[uuid.UUID, int, int]], lease_seconds: int
) -> int:
    """Push out the leases of shards still being worked (job_id, shard_no, attempt)."""
    extended = 0
    for job_id, shard_no, attempt in leases:
        result = session.execute(
            update(Shard)
            .where(
                Shard.job_id == job_id,
                Shard.shard_no == shard_no,
                Shard.attempt == attempt,
                Shard.state == ShardState.running,
            )
            .values(lease_until=func.now() + timedelta(seconds=lease_seconds))
        )
        extended += result.rowcount  # type: ignore[attr-defined]
    return extended


def release_shard(*, session: Session, job_id: uuid.UUID, shard_no: int, attempt: int) -> bool:
    """Give a shard back after a transient failure so another delivery can claim it."""
    result = session.execute(
        update(Shard)
        .where(
            Shard.job_id == job_id,
            Shard.shard_no == shard_no,
            Shard.attempt == attempt,
            Shard.state == ShardState.running,
        )
        .values(state=ShardState.queued, lease_until=None, worker=None, releases=Shard.releases + 1)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def finish_shard(
    *,
    session: Session,
    job_id: uuid.UUID,
    shard_no: int,
    attempt: int,
    succeeded: int,
    failed: int,
    route: str,
    tokens_in: int = 0,
    tokens_out: int = 0,
) -> bool:
    """Mark a shard done if this attempt still holds it (fencing); complete the job when last.

    Returns False when the lease was lost: the caller must roll back, so a late writer never
    overwrites a newer attempt's results.
    """
    won = session.execute(
        update(Shard)
        .where(
            Shard.job_id == job_id,
            Shard.shard_no == shard_no,
            Shard.attempt == attempt,
            Shard.state == ShardState.running,
        )
        .values(
            state=ShardState.done,
            succeeded=succeeded,
            failed=failed,
            route=route,
            tokens_in=tokens_in,
            tokens_out=tokens_out,
            lease_until=None,
            finished_at=func.now(),
        )
        .returning(Shard.shard_no)
    ).scalar_one_or_none()
    if won is None:
        return False
    complete_job_if_done(session=session, job_id=job_id)
    return True


def complete_job_if_done(*, session: Session, job_id: uuid.UUID) -> bool:
    """Set the job `completed` when no shard is left unfinished.

    The job row is locked first so two workers finishing the last two shards at once cannot both
    miss each other's commit. FOR NO KEY UPDATE, not FOR UPDATE: the result rows this transaction
    just inserted hold FOR KEY SHARE on the job through their foreign key, and so do other
    shards' transactions; FOR UPDATE would conflict with those and deadlock two finishing shards.
    """
    status = session.execute(
        select(Job.status).where(Job.id == job_id).with_for_update(key_share=True)
    ).scalar_one()
    if status not in JOB_ACTIVE:
        return False
    unfinished = session.execute(
        select(func.count())
        .select_from(Shard)
        .where(Shard.job_id == job_id, Shard.state.not_in(SHARD_FINISHED))
    ).scalar_one()
    if unfinished:
        return False
    session.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(status=JobStatus.completed, finished_at=func.now())
    )
    logger.info("job %s completed", job_id)
    return True


def cancel_job(*, session: Session, tenant_id: uuid.UUID, job_id: uuid.UUID) -> Job:
    """Stop what has not started. Running shards finish; finished results stay."""
    job = find_job(session=session, tenant_id=tenant_id, job_id=job_id)
    changed = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.in_(JOB_ACTIVE))
        .values(status=JobStatus.cancelled, finished_at=func.now())
        .returning(Job.id)
    ).scalar_one_or_none()
    if changed is not None:
        session.execute(
            update(Shard)
            .where(Shard.job_id == job_id, Shard.state.in_(SHARD_CLAIMABLE))
            .values(state=ShardState.cancelled, finished_at=func.now())
        )
    session.refresh(job)
    return job


@dataclass(frozen=True)
class JobCounts:
    total: int
    succeeded: int
    failed: int
    pending: int
    spilled: int
    cancelled: int


def job_counts(*, session: Session, job: Job) -> JobCounts:
    """Counts from the shard rows (a few thousand rows for a million documents), not results."""
    row = session.execute(
        select(
            func.coalesce(func.sum(Shard.succeeded), 0),
            func.coalesce(func.sum(Shard.failed), 0),
            func.coalesce(func.sum(Shard.doc_count).filter(Shard.route == "spill"), 0),
            func.coalesce(func.sum(Shard.doc_count).filter(Shard.state == ShardState.cancelled), 0),
        ).where(Shard.job_id == job.id)
    ).one()
    succeeded, failed, spilled, cancelled = (int(v) for v in row)
    failed += job.rejected_docs
    pending = max(job.total_docs - succeeded - failed - cancelled, 0)
    return JobCounts(job.total_docs, succeeded, failed, pending, spilled, cancelled)


def expire_leases(*, session: Session) -> int:
    """Mark running shards whose lease ran out as `expired` (their worker died or hung)."""
    result = session.execute(
        update(Shard)
        .where(Shard.state == ShardState.running, Shard.lease_until < func.now())
        .values(state=ShardState.expired, worker=None, enqueued_at=None)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


def shards_to_republish(
    *, session: Session, idle_queues: Sequence[str], grace_seconds: float, stale_seconds: float
) -> list[tuple[uuid.UUID, int, str]]:
    """Claimable shards of active jobs whose doorbell may be lost, so they need a new message.

    - never published (`enqueued_at` NULL: the broker was down at submission, or the lease expired);
    - published but their queue is empty in the broker, so the message is gone (Redis restarted
      empty, FLUSHALL, or a pop-before-ack loss) — after `grace_seconds`, which covers a message
      popped and about to be claimed;
    - published longer ago than `stale_seconds`, whatever the queue shows (a last resort).
    A duplicate message is harmless: the claim turns it into a no-op.
    """
    now = func.now()
    grace = timedelta(seconds=grace_seconds)
    rows = session.execute(
        select(Shard.job_id, Shard.shard_no, Shard.queue)
        .join(Job, Job.id == Shard.job_id)
        .where(
            Job.status.in_(JOB_ACTIVE),
            Shard.state.in_(SHARD_CLAIMABLE),
            or_(
                and_(Shard.enqueued_at.is_(None), Job.created_at < now - grace),
                and_(Shard.queue.in_(list(idle_queues)), Shard.enqueued_at < now - grace),
                Shard.enqueued_at < now - timedelta(seconds=stale_seconds),
            ),
        )
        .order_by(Job.created_at, Shard.shard_no)
        .limit(5000)
    ).all()
    return [(job_id, shard_no, queue) for job_id, shard_no, queue in rows]


def mark_published(*, session: Session, shards: Sequence[tuple[uuid.UUID, int]]) -> None:
    for job_id, shard_no in shards:
        session.execute(
            update(Shard)
            .where(Shard.job_id == job_id, Shard.shard_no == shard_no)
            .values(enqueued_at=func.now())
        )


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


def split_shard(
    *,
    session: Session,
    job_id: uuid.UUID,
    shard_no: int,
    attempt: int,
    children: Sequence[int],
    child_sizes: Sequence[int],
    queue: str,
) -> list[int]:
    """Replace a shard that keeps failing by smaller ones (numbers from child_shard_nos).

    Fenced like finish_shard: returns [] when this attempt no longer holds the shard.
    """
    won = session.execute(
        update(Shard)
        .where(
            Shard.job_id == job_id,
            Shard.shard_no == shard_no,
            Shard.attempt == attempt,
            Shard.state == ShardState.running,
        )
        .values(state=ShardState.replaced, lease_until=None, finished_at=func.now())
        .returning(Shard.shard_no)
    ).scalar_one_or_none()
    if won is None:
        return []
    session.execute(
        insert(Shard).on_conflict_do_nothing(),
        [
            {
                "job_id": job_id,
                "shard_no": no,
                "state": ShardState.queued,
                "queue": queue,
                "doc_count": size,
                "attempt": 0,
            }
            for no, size in zip(children, child_sizes, strict=True)
        ],
    )
    return list(children)


def mark_results_written(*, session: Session, job_id: uuid.UUID, shard_no: int) -> None:
    session.execute(
        update(Shard)
        .where(Shard.job_id == job_id, Shard.shard_no == shard_no)
        .values(results_written_at=func.now())
    )


def unwritten_result_shards(
    *, session: Session, grace_seconds: float, limit: int = 200
) -> list[tuple[uuid.UUID, int]]:
    """Done shards whose S3 result object was never written (the worker died right after its
    commit), older than `grace_seconds`."""
    rows = session.execute(
        select(Shard.job_id, Shard.shard_no)
        .where(
            Shard.state == ShardState.done,
            Shard.results_written_at.is_(None),
            Shard.finished_at < func.now() - timedelta(seconds=grace_seconds),
        )
        .limit(limit)
    ).all()
    return [(job_id, shard_no) for job_id, shard_no in rows]


def spend_by_route(*, session: Session, job_id: uuid.UUID) -> dict[str, dict[str, int]]:
    rows = session.execute(
        select(
            Shard.route,
            func.sum(Shard.succeeded + Shard.failed),
            func.sum(Shard.tokens_in),
            func.sum(Shard.tokens_out),
        )
        .where(Shard.job_id == job_id, Shard.state == ShardState.done)
        .group_by(Shard.route)
    ).all()
    return {
        str(route): {"docs": int(d or 0), "tokens_in": int(i or 0), "tokens_out": int(o or 0)}
        for route, d, i, o in rows
        if route
    }
