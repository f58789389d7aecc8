"""Webhooks: the tenant's default target and signing secret (/v1/webhooks), and a job's
delivery log (/v1/jobs/{id}/webhooks)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, Field

from api.deps import CallerDep, SessionDep, SettingsDep
from api.responses import error_responses
from postroom.jobs import find_job
from postroom.webhook_targets import check_webhook_url
from postroom.webhooks import job_deliveries, message_id, set_tenant_url, tenant_secret, tenant_url

router = APIRouter(prefix="/v1", tags=["webhooks"])
ERRORS = error_responses(401, 404, 422, 503)


class WebhookSettings(BaseModel):
    url: str | None = Field(description="default target of the tenant's job events")
    secret: str = Field(description="Standard Webhooks signing secret (whsec_…)")


class WebhookTarget(BaseModel):
    url: str | None = Field(description="https URL on a public address; null turns it off")


class DeliveryPublic(BaseModel):
    id: str = Field(description="the webhook-id header, the same on every attempt")
    type: str
    url: str
    state: str = Field(description="pending, delivered or failed (out of retry time)")
    attempts: int
    last_status: int | None
    last_error: str | None
    created_at: datetime
    next_attempt_at: datetime | None
    delivered_at: datetime | None
    log: list[dict[str, Any]]
    payload: dict[str, Any]


class DeliveryList(BaseModel):
    data: list[DeliveryPublic]


@router.get("/webhooks", responses=ERRORS)
def get_webhooks(caller: CallerDep, session: SessionDep) -> WebhookSettings:
    """The tenant's default webhook URL and the secret its events are signed with."""
    secret = tenant_secret(session=session, tenant_id=caller.tenant_id)
    session.commit()
    return WebhookSettings(
        url=tenant_url(session=session, tenant_id=caller.tenant_id), secret=secret
    )


@router.put("/webhooks", responses=ERRORS)
def put_webhooks(
    body: WebhookTarget, caller: CallerDep, session: SessionDep, settings: SettingsDep
) -> WebhookSettings:
    """Set (or clear, with null) the default target of the tenant's job events."""
    check_webhook_url(body.url, allow_private=settings.webhook_allow_private, field="url")
    set_tenant_url(session=session, tenant_id=caller.tenant_id, url=body.url)
    secret = tenant_secret(session=session, tenant_id=caller.tenant_id)
    session.commit()
    return WebhookSettings(url=body.url, secret=secret)


@router.get("/jobs/{job_id}/webhooks", responses=ERRORS)
def get_job_webhooks(job_id: uuid.UUID, caller: CallerDep, session: SessionDep) -> DeliveryList:
    """Every event of the job and every attempt to deliver it."""
    find_job(session=session, tenant_id=caller.tenant_id, job_id=job_id)
    return DeliveryList(
        data=[
            DeliveryPublic(
                id=message_id(row.id),
                type=row.type,
                url=row.url,
                state=row.state,
                attempts=row.attempts,
                last_status=row.last_status,
                last_error=row.last_error,
                created_at=row.created_at,
                next_attempt_at=row.next_attempt_at if row.state == "pending" else None,
                delivered_at=row.delivered_at,
                log=list(row.log),
                payload=row.payload,
            )
            for row in job_deliveries(session=session, job_id=job_id)
        ]
    )
