"""Webhooks end to end on loopback: a receiver that is down, then answers 500, then 200 gets
exactly the signed events (job.completed, job.cancelled), each verified with the reference
Standard Webhooks library and with `postroom webhooks verify`; the delivery log says what
happened; a private or loopback target is refused with 422 where loopback is not allowed."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from sqlalchemy.orm import Session, sessionmaker
from standardwebhooks.webhooks import Webhook

from control.webhooks import make_http, send_due
from postroom.db.models import Job
from postroom.domain import DocResult
from postroom.intake import Rejected
from postroom.settings import Settings
from postroom.tenants import ensure_tenant
from postroom.webhook_signing import verify
from postroom.webhooks import set_tenant_url, tenant_secret
from postroom_cli.client import Client
from postroom_cli.local import free_port, postroom_command
from tests.finished_jobs import finished_job
from tests.postroom.jobrows import make_job
from tests.stack import new_key
from tests.waiting import wait_until


@dataclass
class Receiver:
    """A webhook receiver on loopback: records every request, answers the scripted statuses
    first (then 200)."""

    port: int
    script: list[int] = field(default_factory=list)
    received: list[tuple[dict[str, str], bytes, int]] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/postroom"

    def start(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                status = receiver.script.pop(0) if receiver.script else 200
                receiver.received.append((dict(self.headers.items()), body, status))
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *_: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    found = Receiver(free_port(), script=[500])
    yield found
    found.stop()


def test_a_receiver_gets_exactly_the_signed_events_after_being_down_and_answering_500(
    api_url: str,
    env: dict[str, str],
    sessions: sessionmaker[Session],
    settings: Settings,
    receiver: Receiver,
) -> None:
    # Given a tenant whose default target is the receiver (loopback: allowed for the sender only)
    tenant = f"hooks-{uuid.uuid4().hex[:8]}"
    client = Client(api_url, new_key(sessions, tenant=tenant))
    with sessions.begin() as session:
        set_tenant_url(
            session=session, tenant_id=ensure_tenant(session=session, name=tenant), url=receiver.url
        )
    secret = client.webhooks()["secret"]
    assert secret.startswith("whsec_")
    sender = settings.model_copy(
        update={
            "webhook_allow_private": True,
            "webhook_backoff_base_seconds": 0.1,
            "webhook_backoff_max_seconds": 0.3,
        }
    )
    completed = finished_job(sessions, tenant=tenant, docs=30, shard_size=10)
    cancelled = make_job(sessions, sizes=(5,), tenant=tenant)
    client.cancel(str(cancelled))
    ours = {str(completed), str(cancelled)}

    # When the receiver is down, the first attempts fail and are logged
    with make_http(sender) as http:
        send_due(sessions=sessions, settings=sender, http=http)
        log = client.job_webhooks(str(completed))
        assert [(d["type"], d["state"], d["attempts"]) for d in log] == [
            ("job.completed", "pending", 1)
        ]
        assert "Connect" in (log[0]["last_error"] or "")
        # then it comes up, answers its first request with 500, and every later one with 200
        receiver.start()

        def delivered() -> bool:
            send_due(sessions=sessions, settings=sender, http=http)
            logs = [client.job_webhooks(job)[0] for job in ours]
            return all(d["state"] == "delivered" for d in logs)

        wait_until(delivered, timeout=60, what="both events delivered")

    # Then: exactly our two events, the first one twice (500, then 200), all signed
    mine = [(h, b, s) for h, b, s in receiver.received if json.loads(b)["data"]["id"] in ours]
    by_id: dict[str, list[int]] = {}
    for headers, _, status in mine:  # a retry keeps its webhook-id
        by_id.setdefault(headers["webhook-id"], []).append(status)
    assert sorted(by_id.values()) == [[200], [500, 200]]
    events = {json.loads(b)["data"]["id"]: json.loads(b)["type"] for _, b, s in mine if s == 200}
    assert events == {str(completed): "job.completed", str(cancelled): "job.cancelled"}
    for headers, body, _ in mine:
        Webhook(secret).verify(body, headers)  # the reference implementation agrees
        verify(secret, headers, body)
    with pytest.raises(Exception, match="signature"):
        Webhook(secret).verify(body + b" ", headers)
    done = next(json.loads(b) for _, b, _ in mine if json.loads(b)["type"] == "job.completed")
    assert done["data"]["object"] == "job"
    assert done["data"]["status"] == "completed"
    assert done["data"]["counts"] == {"total": 30, "succeeded": 28, "failed": 2}
    # `postroom webhooks verify`, as a receiver would run it
    headers, body, _ = mine[1]
    command = postroom_command(
        "webhooks",
        "verify",
        "--secret",
        secret,
        "--id",
        headers["webhook-id"],
        "--timestamp",
        headers["webhook-timestamp"],
        "--signature",
        headers["webhook-signature"],
    )
    environ = {**os.environ, **env}
    ok = subprocess.run(command, input=body, env=environ, capture_output=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == b"ok"
    bad = subprocess.run(command, input=body + b"x", env=environ, capture_output=True, timeout=60)
    assert bad.returncode == 1
    log = client.job_webhooks(str(sorted(ours)[0]))[0]
    assert log["state"] == "delivered"
    assert [entry["status"] for entry in log["log"]][-1] == 200


def failure(n: int) -> DocResult:
    return DocResult(id=f"doc-{n}", error="too_long: over the context")


def test_a_job_where_no_document_succeeded_fails_and_its_receiver_gets_job_failed(
    sessions: sessionmaker[Session], settings: Settings, receiver: Receiver
) -> None:
    # Given a tenant whose default target is a receiver on loopback
    tenant = f"failed-hooks-{uuid.uuid4().hex[:8]}"
    with sessions.begin() as session:
        tenant_id = ensure_tenant(session=session, name=tenant)
        set_tenant_url(session=session, tenant_id=tenant_id, url=receiver.url)
        secret = tenant_secret(session=session, tenant_id=tenant_id)
    receiver.start()
    # When every document of one job errors in the worker, and another job's every line was
    # invalid and skipped (and one job has a single success among failures)
    every_error = finished_job(
        sessions,
        tenant=tenant,
        docs=6,
        shard_size=3,
        result=failure,
    )
    bad = Rejected(line=1, id="x", field="text", reason="empty", result_id="x")
    every_skipped = make_job(sessions, sizes=(), rejected=(bad,), tenant=tenant)
    one_success = finished_job(
        sessions,
        tenant=tenant,
        docs=4,
        shard_size=2,
        result=lambda n: DocResult(id=f"doc-{n}", label="a") if n == 3 else failure(n),
    )
    ours = {str(every_error), str(every_skipped), str(one_success)}
    sender = settings.model_copy(
        update={"webhook_allow_private": True, "webhook_backoff_base_seconds": 0.1}
    )
    with make_http(sender) as http:

        def all_sent() -> dict[str, dict[str, Any]] | None:
            send_due(sessions=sessions, settings=sender, http=http)
            got = {json.loads(b)["data"]["id"]: json.loads(b) for _, b, s in receiver.received}
            mine = {k: v for k, v in got.items() if k in ours}
            return mine if len(mine) == len(ours) else None

        events = wait_until(all_sent, timeout=60, what="the three events")
    # Then the first two failed, with the event committed with the status, signed; the third
    # (some documents succeeded) completed
    assert {k: (e["type"], e["data"]["status"]) for k, e in events.items()} == {
        str(every_error): ("job.failed", "failed"),
        str(every_skipped): ("job.failed", "failed"),
        str(one_success): ("job.completed", "completed"),
    }
    assert events[str(every_error)]["data"]["counts"] == {"total": 6, "succeeded": 0, "failed": 6}
    assert "every document failed" in events[str(every_error)]["data"]["error"]
    assert "invalid" in events[str(every_skipped)]["data"]["error"]
    for headers, body, _ in receiver.received:
        if json.loads(body)["data"]["id"] in ours:
            verify(secret, headers, body)
    with sessions() as session:
        assert session.get_one(Job, every_error).status == "failed"


@pytest.mark.parametrize(
    "url",
    [
        "https://10.1.2.3/hook",
        "https://127.0.0.1/hook",
        "https://localhost/hook",
        "https://[::1]/hook",
        "https://169.254.169.254/latest",
        "http://example.com/hook",
    ],
)
def test_a_private_or_plain_http_target_is_refused_with_422(
    api_url: str, sessions: sessionmaker[Session], url: str
) -> None:
    client = Client(api_url, new_key(sessions))
    response = client.http.put("/v1/webhooks", json={"url": url})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["details"][0]["field"] == "url"
    assert "public" in error["message"] or "https" in error["message"]
    job = client.http.post(
        "/v1/jobs",
        json={"labels": ["a", "b"], "documents": [{"id": "1", "text": "x"}], "webhook_url": url},
    )
    assert job.status_code == 422, job.text
    assert job.json()["error"]["details"][0]["field"] == "webhook_url"
    assert httpx.get(f"{api_url}/v1/jobs", headers=client.http.headers).json()["data"] == []
