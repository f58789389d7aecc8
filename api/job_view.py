"""How a job looks on the wire (`JobPublic`): status, counts, rate, ETA and spend, for every
route that returns jobs."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy.orm import Session

from api.schemas import JobPublic
from postroom.costs import route_cost, spend
from postroom.db.models import Job
from postroom.domain import JOB_ACTIVE, JobSpec
from postroom.jobs import JobCounts, cascade_totals, job_counts, root_shards, spend_by_route
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
    by_route = spend_by_route(session=session, job_id=job.id)
    cascade: dict[str, Any] | None = None
    if spec.cascade is not None:
        cascade = _cascade_view(session=session, job=job, spec=spec, settings=settings)
        if cascade["escalated"]:
            # The frontier's work is the cascade route's spend too; a document escalated is
            # counted on both routes, so $ per 1,000 docs divides by the documents instead.
            row = by_route.setdefault(
                spec.cascade.route, {"docs": 0, "tokens_in": 0, "tokens_out": 0}
            )
            row["docs"] += cascade["escalated"]
            row["tokens_in"] += cascade["tokens_in"]
            row["tokens_out"] += cascade["tokens_out"]
    job_spend = spend(settings, by_route, docs=_docs_done(counts, job) if cascade else None)
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
        spend=job_spend,
        cascade=cascade,
        router_note=job.router_note,
        deadline_lost=job.deadline_lost,
        priority=job.priority,
        status_detail=_status_detail(session=session, job=job, settings=settings),
        results_url=f"/v1/jobs/{job.id}/results",
        webhook_url=job.webhook_url,
        expires_after=job.expires_after,
    )


def _docs_done(counts: JobCounts, job: Job) -> int:
    return counts.succeeded + counts.failed - job.rejected_docs


def _cascade_view(
    *, session: Session, job: Job, spec: JobSpec, settings: Settings
) -> dict[str, Any]:
    """The job's cascade: what it asked, and what it did so far (escalated, failed, agreement
    between the two routes, documents left out by the caps, the frontier's spend)."""
    cascade = spec.cascade
    assert cascade is not None
    totals = cascade_totals(session=session, job_id=job.id)
    answered = totals["escalated"] - totals["failed"]
    cost = route_cost(
        settings, cascade.route, tokens_in=totals["tokens_in"], tokens_out=totals["tokens_out"]
    )
    return {
        "below": cascade.below,
        "route": cascade.route,
        "model": cascade.model,
        "max_share": cascade.max_share,
        "max_cost": cascade.max_cost,
        **totals,
        "agreement": round(totals["agreed"] / answered, 4) if answered else None,
        "cost": round(cost, 6),
    }


def _status_detail(*, session: Session, job: Job, settings: Settings) -> str | None:
    """What an unfinished job waits for, when it is something the user should know."""
    if job.status not in JOB_ACTIVE or job.spill == "always":
        return None
    if job.model not in live_models(session=session, settings=settings):
        return waiting_note(job.model)
    return None
