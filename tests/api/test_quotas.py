"""Tenant limits at submission: quotas on documents waiting and per day answer 429 with
Retry-After and a message naming the quota and the current use, counted per tenant, never
leaving a half-created job; a priority above the tenant's maximum is refused until an operator
raises it (admin API and `postroom tenants set`)."""

from __future__ import annotations

import json
import subprocess
import uuid
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from postroom.db.models import Job, Shard, Tenant
from postroom.quotas import set_overrides
from postroom.tenants import create_key
from postroom_cli.client import Client
from postroom_cli.local import postroom_command
from tests.helpers import LABELS, make_docs

# A registered alias no worker serves: accepted jobs wait, so they count as waiting.
WAITING_MODEL = "unserved"


def _tenant(api_url: str, sessions: sessionmaker[Session], **overrides: Any) -> tuple[Client, str]:
    name = f"t-{uuid.uuid4().hex[:12]}"
    with sessions.begin() as session:
        key = create_key(session=session, tenant=name)
        set_overrides(session=session, name=name, changes=overrides)
    return Client(api_url, key), name


def _submit(client: Client, docs: int, **options: Any) -> Any:
    return client.http.post(
        "/v1/jobs",
        json={
            "labels": LABELS,
            "documents": make_docs(docs, prefix=uuid.uuid4().hex[:6]),
            "model": WAITING_MODEL,
            "spill": "never",
            **options,
        },
    )


def _jobs_of(sessions: sessionmaker[Session], name: str) -> tuple[int, int]:
    with sessions() as session:
        tenant_id = session.execute(select(Tenant.id).where(Tenant.name == name)).scalar_one()
        jobs = session.scalar(
            select(func.count()).select_from(Job).where(Job.tenant_id == tenant_id)
        )
        shards = session.scalar(
            select(func.count())
            .select_from(Shard)
            .join(Job, Job.id == Shard.job_id)
            .where(Job.tenant_id == tenant_id)
        )
    return int(jobs or 0), int(shards or 0)


@pytest.fixture
def cancel_after() -> Any:
    made: list[tuple[Client, str]] = []
    yield made
    for client, job_id in made:
        client.cancel(job_id)


@pytest.mark.parametrize(
    ("quota", "words"),
    [("quota_docs_waiting", "documents waiting"), ("quota_docs_per_day", "documents per day")],
)
def test_over_quota_is_429_with_retry_after_and_per_tenant(
    api_url: str,
    sessions: sessionmaker[Session],
    cancel_after: list[tuple[Client, str]],
    quota: str,
    words: str,
) -> None:
    client, name = _tenant(api_url, sessions, **{quota: 150})
    other, _ = _tenant(api_url, sessions, **{quota: 150})
    first = _submit(client, 100)
    assert first.status_code == 201, first.text
    cancel_after.append((client, first.json()["id"]))

    refused = _submit(client, 100)
    assert refused.status_code == 429, refused.text
    retry_after = int(refused.headers["Retry-After"])
    assert 0 < retry_after <= 86_400
    error = refused.json()["error"]
    assert error["code"] == "quota_exceeded"
    assert words in error["message"]
    assert "100" in error["message"]
    assert error["details"][0]["used"] == 100
    assert _jobs_of(sessions, name) == (1, 1)  # nothing of the refused job was recorded

    # Within the quota still passes, and another tenant's use is its own.
    within = _submit(client, 50)
    assert within.status_code == 201, within.text
    cancel_after.append((client, within.json()["id"]))
    theirs = _submit(other, 100)
    assert theirs.status_code == 201, theirs.text
    cancel_after.append((other, theirs.json()["id"]))


def test_a_priority_above_the_tenants_maximum_is_refused_until_raised(
    api_url: str,
    sessions: sessionmaker[Session],
    env: dict[str, str],
    cancel_after: list[tuple[Client, str]],
) -> None:
    client, name = _tenant(api_url, sessions)
    refused = _submit(client, 1, priority="high")
    assert refused.status_code == 403, refused.text
    assert refused.json()["error"]["code"] == "priority_not_allowed"
    assert "postroom tenants set" in refused.json()["error"]["message"]
    bad = _submit(client, 1, priority="urgent")
    assert bad.status_code == 422

    # An operator raises it with the CLI; the next high job passes.
    for args in (
        ("set", name, "--max-priority", "high", "--weight", "2"),
        ("list", name, "--json"),
    ):
        shown = subprocess.run(
            postroom_command("tenants", *args),
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
    [row] = json.loads(shown.stdout)
    assert row["overrides"]["max_priority"] == "high"
    assert row["effective"]["weight"] == 2.0
    accepted = _submit(client, 1, priority="high")
    assert accepted.status_code == 201, accepted.text
    assert accepted.json()["priority"] == "high"
    cancel_after.append((client, accepted.json()["id"]))


def test_admins_read_and_set_tenant_limits(api_url: str, sessions: sessionmaker[Session]) -> None:
    admin, _ = _tenant(api_url, sessions)
    with sessions.begin() as session:
        admin_key = create_key(session=session, tenant=f"ops-{uuid.uuid4().hex[:8]}", admin=True)
    admin = Client(api_url, admin_key)
    _, name = _tenant(api_url, sessions)
    changed = admin.http.patch(
        f"/v1/admin/tenants/{name}", json={"quota_docs_per_day": 1000, "max_priority": "high"}
    )
    assert changed.status_code == 200, changed.text
    row = changed.json()["data"][0]
    assert row["effective"]["docs_per_day"] == 1000
    assert row["overrides"]["max_priority"] == "high"
    assert row["use"] == {"docs_waiting": 0, "docs_today": 0, "running_shards": 0}
    cleared = admin.http.patch(f"/v1/admin/tenants/{name}", json={"quota_docs_per_day": None})
    assert cleared.json()["data"][0]["overrides"]["quota_docs_per_day"] is None
    bad = admin.http.patch(f"/v1/admin/tenants/{name}", json={"weight": -1})
    assert bad.status_code == 422
    assert "weight" in bad.json()["error"]["message"]
