"""/v1/admin: operators' view across tenants (admin keys only: `postroom keys create T --admin`).

To anyone without an admin key these routes answer the 404 of an unknown route, and they are
left out of /openapi.json: they do not reveal that they exist.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query
from pydantic import BaseModel
from sqlalchemy import and_, or_, select

from api.deps import AdminDep, SessionDep, SettingsDep
from api.pages import decode_cursor, encode_cursor
from postroom.db.models import Job, Tenant
from postroom.errors import NotFound
from postroom.jobs import root_shards
from postroom.quotas import set_overrides, tenant_overview
from postroom.tenants import KeyInfo, list_keys, revoke_key

router = APIRouter(prefix="/v1/admin", tags=["admin"], include_in_schema=False)

Limit = Annotated[int, Query(ge=1, le=100)]
Prefix = Annotated[
    str,
    Path(
        pattern="^[0-9a-f]{1,16}$",
        description="the key's public prefix: the hex characters after `pr_`",
    ),
]


class AdminJob(BaseModel):
    id: uuid.UUID
    tenant_id: uuid.UUID
    tenant: str
    status: str
    model: str
    total_docs: int
    shards: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class AdminJobList(BaseModel):
    data: list[AdminJob]
    next_cursor: str | None


class AdminKey(BaseModel):
    """A key as operators see it: never the key itself, never its hash."""

    prefix: str
    tenant_id: uuid.UUID
    tenant: str
    admin: bool
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


class AdminKeyList(BaseModel):
    data: list[AdminKey]
    next_cursor: str | None


def _key(info: KeyInfo) -> AdminKey:
    return AdminKey(
        prefix=info.prefix,
        tenant_id=info.tenant_id,
        tenant=info.tenant,
        admin=info.is_admin,
        created_at=info.created_at,
        last_used_at=info.last_used_at,
        revoked_at=info.revoked_at,
    )


@router.get("/jobs")
def list_all_jobs(
    _: AdminDep,
    session: SessionDep,
    limit: Limit = 20,
    cursor: str | None = None,
    tenant: str | None = None,
    status: str | None = None,
) -> AdminJobList:
    """Every tenant's jobs, newest first; `?tenant=NAME`, `?status=running` narrow it."""
    query: Any = (
        select(Job, Tenant.name)
        .join(Tenant, Tenant.id == Job.tenant_id)
        .where(Job.deleted_at.is_(None))
    )
    if tenant is not None:
        query = query.where(Tenant.name == tenant)
    if status is not None:
        query = query.where(Job.status == status)
    if cursor:
        created, job_id = decode_cursor(cursor)
        query = query.where(
            or_(Job.created_at < created, and_(Job.created_at == created, Job.id < job_id))
        )
    rows = session.execute(
        query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)
    ).all()
    data = [
        AdminJob(
            id=job.id,
            tenant_id=job.tenant_id,
            tenant=name,
            status=job.status,
            model=job.model,
            total_docs=job.total_docs,
            shards=root_shards(session=session, job=job),
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
        )
        for job, name in rows[:limit]
    ]
    last = rows[limit - 1][0] if len(rows) > limit else None
    return AdminJobList(
        data=data, next_cursor=encode_cursor(last.created_at, last.id) if last else None
    )


@router.get("/keys")
def list_all_keys(
    _: AdminDep,
    session: SessionDep,
    limit: Limit = 100,
    cursor: str | None = None,
    tenant: str | None = None,
) -> AdminKeyList:
    """Every key, newest first: prefix, tenant, created, last used, revoked (never the hash)."""
    before = decode_cursor(cursor) if cursor else None
    keys = list_keys(session=session, tenant=tenant, before=before, limit=limit + 1)
    last = keys[limit - 1] if len(keys) > limit else None
    return AdminKeyList(
        data=[_key(k) for k in keys[:limit]],
        next_cursor=encode_cursor(last.created_at, last.id) if last else None,
    )


@router.post("/keys/{prefix}/revoke")
def revoke(prefix: Prefix, _: AdminDep, session: SessionDep) -> AdminKeyList:
    """Revoke the key(s) with this prefix, at once: their next request gets 401. Revoking a key
    twice is harmless; it keeps its first revocation time."""
    if not list_keys(session=session, prefix=prefix, limit=1):
        raise NotFound(
            f"no key with prefix {prefix!r}; list them with GET /v1/admin/keys",
            details=[{"field": "prefix"}],
        )
    revoke_key(session=session, prefix=prefix)
    session.commit()
    return AdminKeyList(
        data=[_key(k) for k in list_keys(session=session, prefix=prefix)], next_cursor=None
    )


class TenantLimitsPatch(BaseModel):
    """Overrides to set on a tenant; a field sent as null goes back to the deployment's setting,
    a field left out stays as it is."""

    model_config = {"extra": "forbid"}

    weight: float | None = None
    max_priority: Literal["high", "normal", "low"] | None = None
    quota_docs_waiting: int | None = None
    quota_docs_per_day: int | None = None
    quota_running_shards: int | None = None


class AdminTenantList(BaseModel):
    data: list[dict[str, Any]]


@router.get("/tenants")
def list_tenants(
    _: AdminDep, session: SessionDep, settings: SettingsDep, name: str | None = None
) -> AdminTenantList:
    """Every tenant (or `?name=`): overrides, effective limits and current use."""
    return AdminTenantList(data=tenant_overview(session=session, settings=settings, name=name))


@router.patch("/tenants/{name}")
def patch_tenant(
    name: Annotated[str, Path(min_length=1, max_length=200)],
    body: TenantLimitsPatch,
    _: AdminDep,
    session: SessionDep,
    settings: SettingsDep,
) -> AdminTenantList:
    """Set a tenant's weight, maximum priority and quotas (created if new)."""
    set_overrides(session=session, name=name, changes=body.model_dump(exclude_unset=True))
    session.commit()
    return AdminTenantList(data=tenant_overview(session=session, settings=settings, name=name))
