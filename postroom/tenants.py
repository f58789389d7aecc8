"""Tenants and their API keys (stored hashed; shown once at creation)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import and_, or_, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from postroom.db.models import ApiKey, Tenant
from postroom.errors import Unauthorized
from postroom.keys import hash_api_key, new_api_key

# last_used_at is refreshed at most this often, so a busy key is not a write per request.
LAST_USED_RESOLUTION = timedelta(seconds=60)


@dataclass(frozen=True)
class Caller:
    tenant_id: uuid.UUID
    key_id: uuid.UUID
    is_admin: bool


def ensure_tenant(*, session: Session, name: str) -> uuid.UUID:
    session.execute(insert(Tenant).values(id=uuid.uuid4(), name=name).on_conflict_do_nothing())
    return session.execute(select(Tenant.id).where(Tenant.name == name)).scalar_one()


def create_key(*, session: Session, tenant: str, admin: bool = False) -> str:
    """Create a key for a tenant (creating the tenant if new); returns the key, shown only once."""
    tenant_id = ensure_tenant(session=session, name=tenant)
    key, prefix, key_hash = new_api_key()
    session.add(ApiKey(tenant_id=tenant_id, prefix=prefix, key_hash=key_hash, is_admin=admin))
    session.flush()
    return key


def revoke_key(*, session: Session, prefix: str) -> int:
    result = session.execute(
        update(ApiKey)
        .where(ApiKey.prefix == prefix, ApiKey.revoked_at.is_(None))
        .values(revoked_at=datetime.now(UTC))
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class KeyInfo:
    """What an operator may see of a key: never the key, never its hash."""

    id: uuid.UUID
    prefix: str
    tenant_id: uuid.UUID
    tenant: str
    is_admin: bool
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


def list_keys(
    *,
    session: Session,
    tenant: str | None = None,
    prefix: str | None = None,
    before: tuple[datetime, uuid.UUID] | None = None,
    limit: int = 100,
) -> list[KeyInfo]:
    """Keys of every tenant (or one), newest first; `before` is the (created_at, id) of the last
    key of the previous page."""
    query = select(
        ApiKey.id,
        ApiKey.prefix,
        ApiKey.tenant_id,
        Tenant.name,
        ApiKey.is_admin,
        ApiKey.created_at,
        ApiKey.last_used_at,
        ApiKey.revoked_at,
    ).join(Tenant, Tenant.id == ApiKey.tenant_id)
    if tenant is not None:
        query = query.where(Tenant.name == tenant)
    if prefix is not None:
        query = query.where(ApiKey.prefix == prefix)
    if before is not None:
        created, key_id = before
        query = query.where(
            or_(
                ApiKey.created_at < created,
                and_(ApiKey.created_at == created, ApiKey.id < key_id),
            )
        )
    rows = session.execute(
        query.order_by(ApiKey.created_at.desc(), ApiKey.id.desc()).limit(limit)
    ).all()
    return [KeyInfo(*row) for row in rows]


def authenticate(*, session: Session, key: str) -> Caller:
    """The caller behind a bearer key; Unauthorized for unknown or revoked keys."""
    row = session.execute(
        select(ApiKey).where(ApiKey.key_hash == hash_api_key(key), ApiKey.revoked_at.is_(None))
    ).scalar_one_or_none()
    if row is None:
        raise Unauthorized(
            "the API key is not valid; create one with `postroom keys create TENANT`"
        )
    now = datetime.now(UTC)
    if row.last_used_at is None or now - row.last_used_at > LAST_USED_RESOLUTION:
        session.execute(update(ApiKey).where(ApiKey.id == row.id).values(last_used_at=now))
    return Caller(tenant_id=row.tenant_id, key_id=row.id, is_admin=row.is_admin)
