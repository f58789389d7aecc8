"""The webhook sender, a task of `postroom beat`: drain the outbox (webhook_deliveries), sign each
event with its tenant's secret (Standard Webhooks headers) and POST it, pinned to an address
checked at send time, with no redirects followed; a failure is retried with backoff until
POSTROOM_WEBHOOK_RETRY_SECONDS after the event.

At least once: a delivery is claimed (pushed ahead by a lease) before it is sent and recorded
after, so a sender that dies in between sends it again once the lease runs out. Receivers dedupe
on `webhook-id`, which is the same on every attempt.
"""

from __future__ import annotations

import json
import logging
import ssl
import time
import uuid
from dataclasses import dataclass

import httpx
from sqlalchemy.orm import Session, sessionmaker

from postroom.settings import Settings
from postroom.webhook_signing import signed_headers
from postroom.webhook_targets import TargetRefused, resolve_target
from postroom.webhooks import claim_due, message_id, record_attempt, tenant_secret

logger = logging.getLogger(__name__)


@dataclass
class Outgoing:
    delivery_id: uuid.UUID
    url: str
    body: bytes
    secret: str


@dataclass
class SendReport:
    sent: int = 0
    delivered: int = 0
    failed: int = 0


def post_pinned(
    http: httpx.Client, url: str, *, body: bytes, headers: dict[str, str], allow_private: bool
) -> httpx.Response:
    """POST to the first address the host resolves to now (each checked), so a DNS answer that
    changes between the check and the connection cannot send it elsewhere. TLS still checks the
    certificate against the host name (SNI), and redirects are never followed.

    Raises:
        TargetRefused: the URL or its addresses are not allowed.
        httpx.HTTPError: the request failed.
    """
    addresses = resolve_target(url, allow_private=allow_private)
    target = httpx.URL(url)
    pinned = target.copy_with(host=str(addresses[0]))
    return http.post(
        pinned,
        content=body,
        headers={**headers, "host": target.netloc.decode("ascii")},
        extensions={"sni_hostname": target.host},
        follow_redirects=False,
    )


def _claim(sessions: sessionmaker[Session], settings: Settings) -> list[Outgoing]:
    lease = settings.webhook_timeout_seconds * 3
    with sessions.begin() as session:
        rows = claim_due(
            session=session, limit=settings.webhook_deliveries_per_tick, lease_seconds=lease
        )
        return [
            Outgoing(
                row.id,
                row.url,
                json.dumps(row.payload, separators=(",", ":")).encode(),
                tenant_secret(session=session, tenant_id=row.tenant_id),
            )
            for row in rows
        ]


def _send(http: httpx.Client, out: Outgoing, settings: Settings) -> tuple[int | None, str | None]:
    headers = signed_headers(out.secret, msg_id=message_id(out.delivery_id), body=out.body)
    try:
        response = post_pinned(
            http,
            out.url,
            body=out.body,
            headers=headers,
            allow_private=settings.webhook_allow_private,
        )
    except TargetRefused as e:
        return None, f"refused: {e}"
    except httpx.HTTPError as e:
        return None, f"{e.__class__.__name__}: {e}"[:500]
    if 200 <= response.status_code < 300:
        return response.status_code, None
    if 300 <= response.status_code < 400:
        where = response.headers.get("location", "")[:200]
        return response.status_code, f"redirect to {where!r} not followed"
    return response.status_code, f"HTTP {response.status_code}"


def send_due(
    *, sessions: sessionmaker[Session], settings: Settings, http: httpx.Client
) -> SendReport:
    """One pass over the deliveries that are due."""
    report = SendReport()
    for out in _claim(sessions, settings):
        started = time.monotonic()
        status, error = _send(http, out, settings)
        millis = int((time.monotonic() - started) * 1000)
        with sessions.begin() as session:
            state = record_attempt(
                session=session,
                delivery_id=out.delivery_id,
                status=status,
                error=error,
                millis=millis,
                settings=settings,
            )
        report.sent += 1
        report.delivered += state == "delivered"
        report.failed += state == "failed"
        if error:
            logger.warning("webhook %s: %s (%s)", message_id(out.delivery_id), error, state)
    return report


def make_http(settings: Settings) -> httpx.Client:
    """The sender's client: certificates verified (against POSTROOM_WEBHOOK_CA_BUNDLE when set),
    redirects never followed."""
    verify: ssl.SSLContext | bool = True
    if settings.webhook_ca_bundle:
        verify = ssl.create_default_context(cafile=settings.webhook_ca_bundle)
    return httpx.Client(
        timeout=settings.webhook_timeout_seconds, follow_redirects=False, verify=verify
    )
