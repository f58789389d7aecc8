"""A tenant's limits: its fair-share weight, the highest priority it may ask for, and its quotas
on documents waiting, documents per day and shards running at once (settings, overridden per
tenant on its row by operators). The first two quotas are checked at submission; shards running
at once is kept at claim time (postroom.policy)."""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from postroom.db.models import Job, Shard, Tenant
from postroom.domain import JOB_ACTIVE, ShardState
from postroom.errors import InvalidInput, PriorityNotAllowed, QuotaExceeded
from postroom.policy import PRIORITIES
from postroom.settings import Settings
from postroom.tenants import ensure_tenant


@dataclass(frozen=True)
class TenantLimits:
    """A tenant's effective limits (its overrides, else the settings); 0 = no limit."""

    weight: float
    max_priority: str
    docs_waiting: int
    docs_per_day: int
    running_shards: int


def tenant_limits(tenant: Tenant, settings: Settings) -> TenantLimits:
    def pick(own: int | None, default: int) -> int:
        return default if own is None else own

    return TenantLimits(
        weight=tenant.weight or settings.tenant_weight,
        max_priority=tenant.max_priority or settings.tenant_max_priority,
        docs_waiting=pick(tenant.quota_docs_waiting, settings.quota_docs_waiting),
        docs_per_day=pick(tenant.quota_docs_per_day, settings.quota_docs_per_day),
        running_shards=pick(tenant.quota_running_shards, settings.quota_running_shards),
    )


def docs_waiting(*, session: Session, tenant_id: uuid.UUID) -> int:
    """Documents of the tenant's active jobs not finished yet (waiting or running)."""
    return int(
        session.execute(
            select(func.coalesce(func.sum(Shard.doc_count), 0))
            .join(Job, Job.id == Shard.job_id)
            .where(
                Job.tenant_id == tenant_id,
                Job.status.in_(JOB_ACTIVE),
                Shard.state.in_((ShardState.queued, ShardState.expired, ShardState.running)),
            )
        ).scalar_one()
    )


def docs_today(*, session: Session, tenant_id: uuid.UUID, since: datetime) -> int:
    """Documents the tenant submitted since `since` (midnight UTC), in every job accepted."""
    return int(
        session.execute(
            select(func.coalesce(func.sum(Job.total_docs), 0)).where(
                Job.tenant_id == tenant_id, Job.created_at >= since
            )
        ).scalar_one()
    )


def admit_job(
    *, session: Session, tenant_id: uuid.UUID, docs: int, priority: str, settings: Settings
) -> None:
    """Refuse a job its tenant may not submit now, in the caller's transaction, before any row
    is written: PriorityNotAllowed (403), or QuotaExceeded (429 with Retry-After) naming the
    quota and the current use. The tenant row is locked, so two submissions of one tenant are
    counted one after the other and cannot both slip under a quota."""
    tenant = session.execute(
        select(Tenant).where(Tenant.id == tenant_id).with_for_update()
    ).scalar_one()
    limits = tenant_limits(tenant, settings)
    if PRIORITIES.index(priority) < PRIORITIES.index(limits.max_priority):
        raise PriorityNotAllowed(
            f"priority {priority!r} is above this tenant's maximum {limits.max_priority!r}; "
            f"send priority {limits.max_priority!r} or lower, or ask an operator to raise it "
            "(postroom tenants set TENANT --max-priority high)",
            details=[{"field": "priority", "max_priority": limits.max_priority}],
        )
    if limits.docs_waiting:
        waiting = docs_waiting(session=session, tenant_id=tenant_id)
        if waiting + docs > limits.docs_waiting:
            raise QuotaExceeded(
                f"quota documents waiting: this tenant has {waiting:,} documents waiting or "
                f"running and this job adds {docs:,}; the quota is {limits.docs_waiting:,}. "
                "Retry when some have finished, or send a smaller job",
                retry_after=settings.quota_retry_after_seconds,
                details=[{"quota": "docs_waiting", "limit": limits.docs_waiting, "used": waiting}],
            )
    if limits.docs_per_day:
        now = datetime.now(UTC)
        midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
        today = docs_today(session=session, tenant_id=tenant_id, since=midnight)
        if today + docs > limits.docs_per_day:
            tomorrow = midnight + timedelta(days=1)
            raise QuotaExceeded(
                f"quota documents per day: this tenant submitted {today:,} documents today "
                f"(UTC) and this job adds {docs:,}; the quota is {limits.docs_per_day:,}. "
                "Retry after midnight UTC, or send a smaller job",
                retry_after=max(1, int((tomorrow - now).total_seconds())),
                details=[{"quota": "docs_per_day", "limit": limits.docs_per_day, "used": today}],
            )


# The per-tenant overrides an operator may set (None puts a field back to the setting).
OVERRIDES = (
    "weight",
    "max_priority",
    "quota_docs_waiting",
    "quota_docs_per_day",
    "quota_running_shards",
)


def set_overrides(*, session: Session, name: str, changes: dict[str, Any]) -> None:
    """Set (or, with None, clear) a tenant's overrides; creates the tenant if new.

    Raises InvalidInput naming the field for an unknown field or a bad value."""
    unknown = sorted(set(changes) - set(OVERRIDES))
    if unknown:
        raise InvalidInput(
            f"unknown tenant setting(s): {', '.join(unknown)}; use {', '.join(OVERRIDES)}",
            details=[{"field": field} for field in unknown],
        )
    for field, value in changes.items():
        bad = value is not None and (
            (field == "max_priority" and value not in PRIORITIES)
            or (field == "weight" and not (isinstance(value, int | float) and value > 0))
            or (field.startswith("quota_") and not (isinstance(value, int) and value >= 0))
        )
        if bad:
            raise InvalidInput(
                f"{field}={value!r} is not valid: weight is a number > 0, max_priority one of "
                f"{', '.join(PRIORITIES)}, a quota a whole number >= 0 (0 = no limit)",
                details=[{"field": field}],
            )
    tenant_id = ensure_tenant(session=session, name=name)
    if changes:
        session.execute(update(Tenant).where(Tenant.id == tenant_id).values(**changes))


def tenant_overview(
    *, session: Session, settings: Settings, name: str | None = None
) -> list[dict[str, Any]]:
    """Each tenant (or one): its overrides, its effective limits and its current use."""
    query = select(Tenant).order_by(Tenant.name)
    if name is not None:
        query = query.where(Tenant.name == name)
    midnight = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    out = []
    for tenant in session.scalars(query).all():
        running = session.execute(
            select(func.count())
            .select_from(Shard)
            .join(Job, Job.id == Shard.job_id)
            .where(Job.tenant_id == tenant.id, Shard.state == ShardState.running)
        ).scalar_one()
        out.append(
            {
                "name": tenant.name,
                "overrides": {field: getattr(tenant, field) for field in OVERRIDES},
                "effective": asdict(tenant_limits(tenant, settings)),
                "use": {
                    "docs_waiting": docs_waiting(session=session, tenant_id=tenant.id),
                    "docs_today": docs_today(session=session, tenant_id=tenant.id, since=midnight),
                    "running_shards": int(running),
                },
            }
        )
    return out
