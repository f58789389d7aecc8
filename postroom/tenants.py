"""Tenants and their API keys (stored hashed; shown once at creation)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import select, update
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
