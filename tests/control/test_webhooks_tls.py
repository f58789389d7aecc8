"""The https path of the webhook sender against a real TLS server on loopback: the sender
connects to the address it resolved and checked (pinned), yet sends the URL's host name as SNI
and checks the certificate against it. A receiver whose certificate names the host gets the
signed event; one whose certificate names another host is refused and nothing is delivered.
The certificates come from a CA made at test time (trustme), named by
POSTROOM_WEBHOOK_CA_BUNDLE."""

from __future__ import annotations

import json
import ssl
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import trustme
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from control.webhooks import make_http, send_due
from postroom.db.models import WebhookDelivery
from postroom.settings import Settings
from postroom.tenants import ensure_tenant
from postroom.webhook_signing import verify
from postroom.webhook_targets import resolve_target
from postroom.webhooks import set_tenant_url, tenant_secret
from postroom_cli.local import free_port
from tests.finished_jobs import finished_job
from tests.waiting import wait_until

HOST = "localhost"


@dataclass
class TlsReceiver:
    """An https receiver bound to `address`, presenting a certificate for `names`; records
    every request and the SNI name each connection asked for."""

    address: str
    cert: trustme.LeafCert
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    sni: list[str | None] = field(default_factory=list)
    port: int = field(default_factory=free_port)
    server: ThreadingHTTPServer | None = None

    def start(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                receiver.received.append((dict(self.headers.items()), body))
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *_: object) -> None:
                pass

        class Server(ThreadingHTTPServer):
            address_family = 10 if ":" in self.address else 2  # AF_INET6 / AF_INET

        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.cert.configure_cert(context)

        def remember_sni(_sock: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
            receiver.sni.append(name)

        context.sni_callback = remember_sni  # type: ignore[assignment]
        self.server = Server((self.address, self.port), Handler)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def sender(ca: trustme.CA, tmp_path: Path, settings: Settings) -> Settings:
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    return settings.model_copy(
        update={"webhook_allow_private": True, "webhook_ca_bundle": str(bundle)}
    )


def start_receiver(cert: trustme.LeafCert) -> TlsReceiver:
    # Bound to the address the sender will pin to: the first that `localhost` resolves to.
    pinned = str(resolve_target(f"https://{HOST}/", allow_private=True)[0])
    receiver = TlsReceiver(pinned, cert)
    receiver.start()
    return receiver


@pytest.fixture
def valid(ca: trustme.CA) -> Iterator[TlsReceiver]:
    receiver = start_receiver(ca.issue_cert(HOST))
    yield receiver
    receiver.stop()


@pytest.fixture
def wrong_name(ca: trustme.CA) -> Iterator[TlsReceiver]:
    receiver = start_receiver(ca.issue_cert("receiver.example.org"))
    yield receiver
    receiver.stop()


def job_with_https_target(sessions: sessionmaker[Session], port: int) -> tuple[uuid.UUID, str]:
    """A completed job of a tenant whose default target is https://localhost:port; the job's
    id and the tenant's signing secret."""
    tenant = f"tls-hooks-{uuid.uuid4().hex[:8]}"
    with sessions.begin() as session:
        tenant_id = ensure_tenant(session=session, name=tenant)
        set_tenant_url(session=session, tenant_id=tenant_id, url=f"https://{HOST}:{port}/hook")
        secret = tenant_secret(session=session, tenant_id=tenant_id)
    return finished_job(sessions, tenant=tenant, docs=3, shard_size=3), secret


def delivery(sessions: sessionmaker[Session], job_id: uuid.UUID) -> WebhookDelivery:
    with sessions() as session:
        return session.execute(
            select(WebhookDelivery).where(WebhookDelivery.job_id == job_id)
        ).scalar_one()


def test_a_receiver_with_a_certificate_for_the_host_gets_the_signed_event(
    sessions: sessionmaker[Session], sender: Settings, valid: TlsReceiver
) -> None:
    job_id, secret = job_with_https_target(sessions, valid.port)
    with make_http(sender) as http:

        def delivered() -> bool:
            send_due(sessions=sessions, settings=sender, http=http)
            return delivery(sessions, job_id).state == "delivered"

        wait_until(delivered, timeout=30, what="the https delivery")
    mine = [(h, b) for h, b in valid.received if json.loads(b)["data"]["id"] == str(job_id)]
    assert len(mine) == 1
    headers, body = mine[0]
    verify(secret, headers, body)
    assert json.loads(body)["type"] == "job.completed"
    # Connected to the pinned address, but named the host: in SNI and in the Host header
    assert HOST in valid.sni
    assert headers["host"] == f"{HOST}:{valid.port}"


def test_a_receiver_with_a_certificate_for_another_name_is_refused(
    sessions: sessionmaker[Session], sender: Settings, wrong_name: TlsReceiver
) -> None:
    job_id, _ = job_with_https_target(sessions, wrong_name.port)
    with make_http(sender) as http:

        def tried() -> WebhookDelivery | None:
            send_due(sessions=sessions, settings=sender, http=http)
            row = delivery(sessions, job_id)
            return row if row.attempts >= 1 else None

        row = wait_until(tried, timeout=30, what="an https attempt")
    assert row.state == "pending"  # to be retried, never delivered
    assert row.last_status is None
    assert "hostname mismatch" in (row.last_error or "").lower(), row.last_error
    assert HOST in wrong_name.sni  # the handshake was made, for the host's name
    assert not [b for _, b in wrong_name.received if json.loads(b)["data"]["id"] == str(job_id)]
