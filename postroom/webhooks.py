"""Webhook events in Postgres: the outbox rows written with the state change they report, what
the sender claims and records, the per-job delivery log and each tenant's target and secret.
Functions take the session and never commit; the sending itself is control.webhooks."""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from postroom.db.models import Job, Shard, Tenant, WebhookDelivery
from postroom.settings import Settings
from postroom.webhook_signing import new_secret

JOB_EVENTS = ("job.completed", "job.failed", "job.cancelled", "job.expired")
BATCH_EVENTS = ("batch.completed", "batch.failed", "batch.cancelled", "batch.expired")
EVENT_NAMESPACE = uuid.UUID("3f0c6f1e-9a51-4d1e-8f59-5c1f3b2a7d10")


def message_id(delivery_id: uuid.UUID) -> str:
    """The `webhook-id` header: stable across retries."""
    return f"msg_{delivery_id.hex}"


def _event_id(job_id: uuid.UUID, event: str) -> uuid.UUID:
    """One event of a kind per job: a repeated state change (a rerun, a race) inserts nothing."""
    return uuid.uuid5(EVENT_NAMESPACE, f"{job_id}:{event}")


def _insert(
    session: Session,
    *,
    job_id: uuid.UUID,
    event: str,
    url: str,
    tenant_id: uuid.UUID,
    data: dict[str, Any],
) -> None:
    payload = {"type": event, "timestamp": datetime.now(UTC).isoformat(), "data": data}
    session.execute(
        insert(WebhookDelivery)
        .values(
            id=_event_id(job_id, event),
            job_id=job_id,
            tenant_id=tenant_id,
            type=event,
            url=url,
            payload=payload,
            state="pending",
            attempts=0,
            next_attempt_at=func.now(),
            log=[],
        )
        .on_conflict_do_nothing(index_elements=[WebhookDelivery.id])
    )


def enqueue_job_event(*, session: Session, job_id: uuid.UUID, event: str) -> bool:
    """Record `event` for the job in the caller's transaction, if it (or its tenant) has a
    webhook URL. Returns whether a target was found."""
    assert event in JOB_EVENTS, event
    row = session.execute(
        select(
            Job.tenant_id,
            Job.status,
            Job.error,
            Job.job_metadata,
            Job.total_docs,
            Job.rejected_docs,
            func.coalesce(Job.webhook_url, Tenant.webhook_url),
        )
        .join(Tenant, Tenant.id == Job.tenant_id)
        .where(Job.id == job_id)
    ).one_or_none()
    if row is None or row[-1] is None:
        return False
    tenant_id, status, error, metadata, total, rejected, url = row
    succeeded, failed = session.execute(
        select(
            func.coalesce(func.sum(Shard.succeeded), 0), func.coalesce(func.sum(Shard.failed), 0)
        ).where(Shard.job_id == job_id)
    ).one()
    data = {
        "id": str(job_id),
        "object": "job",
        "status": status,
        "error": error,
        "metadata": metadata,
        "counts": {"total": total, "succeeded": int(succeeded), "failed": int(failed) + rejected},
        "results_url": f"/v1/jobs/{job_id}/results",
    }
    _insert(session, job_id=job_id, event=event, url=url, tenant_id=tenant_id, data=data)
    return True


def enqueue_batch_event(
    *, session: Session, job_id: uuid.UUID, tenant_id: uuid.UUID, event: str, batch: str
) -> bool:
    """An OpenAI batch's end (`batch.completed` …) to the tenant's default target."""
    assert event in BATCH_EVENTS, event
    url = session.execute(select(Tenant.webhook_url).where(Tenant.id == tenant_id)).scalar_one()
    if url is None:
        return False
    data = {"id": batch, "object": "batch", "status": event.removeprefix("batch.")}
    _insert(session, job_id=job_id, event=event, url=url, tenant_id=tenant_id, data=data)
    return True


def tenant_secret(*, session: Session, tenant_id: uuid.UUID) -> str:
    """The tenant's signing secret, made (once, race-free) on first use."""
    session.execute(
        update(Tenant)
        .where(Tenant.id == tenant_id, Tenant.webhook_secret.is_(None))
        .values(webhook_secret=new_secret())
    )
    return (
        session.execute(select(Tenant.webhook_secret).where(Tenant.id == tenant_id)).scalar_one()
        or ""
    )


def set_tenant_url(*, session: Session, tenant_id: uuid.UUID, url: str | None) -> None:
    session.execute(update(Tenant).where(Tenant.id == tenant_id).values(webhook_url=url))


def tenant_url(*, session: Session, tenant_id: uuid.UUID) -> str | None:
    return session.execute(select(Tenant.webhook_url).where(Tenant.id == tenant_id)).scalar_one()


def claim_due(*, session: Session, limit: int, lease_seconds: float) -> list[WebhookDelivery]:
    """Pending deliveries whose time has come, pushed `lease_seconds` ahead so another beat (or
    this one's next tick) does not send them too while they are in flight."""
    rows = list(
        session.scalars(
            select(WebhookDelivery)
            .where(
                WebhookDelivery.state == "pending", WebhookDelivery.next_attempt_at <= func.now()
            )
            .order_by(WebhookDelivery.next_attempt_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
    )
    if rows:
        session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id.in_([r.id for r in rows]))
            .values(next_attempt_at=func.now() + timedelta(seconds=lease_seconds))
        )
    return rows


def backoff_seconds(attempts: int, *, settings: Settings) -> float:
    """Exponential with jitter: base * 2^(attempts-1), capped, +/-20 %."""
    delay: float = settings.webhook_backoff_base_seconds * 2 ** max(attempts - 1, 0)
    return min(delay, settings.webhook_backoff_max_seconds) * random.uniform(0.8, 1.2)


def record_attempt(
    *,
    session: Session,
    delivery_id: uuid.UUID,
    status: int | None,
    error: str | None,
    millis: int,
    settings: Settings,
) -> str:
    """Log one attempt; the delivery is `delivered`, `pending` again after a backoff, or
    `failed` once POSTROOM_WEBHOOK_RETRY_SECONDS have passed since the event. Returns the state."""
    row = session.get_one(WebhookDelivery, delivery_id, with_for_update=True)
    now = datetime.now(UTC)
    row.attempts += 1
    row.last_status = status
    row.last_error = error
    row.log = [
        *row.log,
        {
            "at": now.isoformat(),
            "attempt": row.attempts,
            "status": status,
            "error": error,
            "ms": millis,
        },
    ]
    if error is None:
        row.state, row.delivered_at = "delivered", now
    elif now - row.created_at >= timedelta(seconds=settings.webhook_retry_seconds):
        row.state = "failed"
    else:
        row.next_attempt_at = now + timedelta(
            seconds=backoff_seconds(row.attempts, settings=settings)
        )
    return row.state


def job_deliveries(*, session: Session, job_id: uuid.UUID) -> list[WebhookDelivery]:
    return list(
        session.scalars(
            select(WebhookDelivery)
            .where(WebhookDelivery.job_id == job_id)
            .order_by(WebhookDelivery.created_at, WebhookDelivery.type)
        )
    )
