"""How a job looks on the wire (`JobPublic`): status, counts, rate, ETA and spend, for every
route that returns jobs."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy.orm import Session

from api.schemas import JobPublic
from postroom.costs import spend
from postroom.db.models import Job
from postroom.domain import JOB_ACTIVE, JobSpec
from postroom.jobs import job_counts, root_shards, spend_by_route
from postroom.registry import live_models, waiting_note
from postroom.settings import Settings


def job_public(*, session: Session, job: Job, settings: Settings) -> JobPublic:
    spec = JobSpec.model_validate(job.spec)
    counts = job_counts(session=session, job=job)
    rate: float | None = None
    eta: float | None = None
    if job.started_at is not None:
        end = job.finished_at or datetime.now(UTC)
        elapsed = (end - job.started_at).total_seconds()
        done = counts.succeeded + counts.failed - job.rejected_docs
        if elapsed > 0 and done > 0:
            rate = round(done / elapsed, 2)
            eta = round(counts.pending / rate, 1) if job.finished_at is None else 0.0
    return JobPublic(
        id=job.id,
        status=job.status,
        mode=spec.mode,
        model=spec.model,
        revision=spec.revision,
        decoding=spec.decoding,
        labels=spec.labels,
        spill=job.spill,
        deadline=job.deadline,
        metadata=job.job_metadata,
        counts=counts,
        shards=root_shards(session=session, job=job),
        warnings=list(job.warnings or []),
        error=job.error,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        rate_docs_per_second=rate,
        eta_seconds=eta,
        max_spill_cost=job.max_spill_cost,
        estimate=job.estimate,
        spend=spend(settings, spend_by_route(session=session, job_id=job.id)),
        router_note=job.router_note,
        priority=job.priority,
        status_detail=_status_detail(session=session, job=job, settings=settings),
        results_url=f"/v1/jobs/{job.id}/results",
        webhook_url=job.webhook_url,
        expires_after=job.expires_after,
    )


def _status_detail(*, session: Session, job: Job, settings: Settings) -> str | None:
    """What an unfinished job waits for, when it is something the user should know."""
    if job.status not in JOB_ACTIVE or job.spill == "always":
        return None
    if job.model not in live_models(session=session, settings=settings):
        return waiting_note(job.model)
    return None
