"""Keys and tenants: 401 without a valid key, 404 (never 403) for another tenant's job."""

from __future__ import annotations

import httpx
import pytest
from sqlalchemy.orm import Session, sessionmaker

from postroom.tenants import create_key, revoke_key
from postroom_cli.client import Client
from tests.helpers import LABELS, make_docs

pytestmark = pytest.mark.usefixtures("worker")


@pytest.fixture
def job_id(client: Client) -> str:
    response = client.http.post("/v1/jobs", json={"labels": LABELS, "documents": make_docs(3)})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def test_missing_and_wrong_keys_get_401(api_url: str, job_id: str) -> None:
    for headers in ({}, {"Authorization": "Bearer pr_nope_nope"}, {"Authorization": "Basic x"}):
        response = httpx.get(f"{api_url}/v1/jobs/{job_id}", headers=headers)
        assert response.status_code == 401
        error = response.json()["error"]
        assert error["code"] == "unauthorized"
        assert "postroom keys create" in error["message"]


def test_other_tenant_gets_404_on_every_route(
    api_url: str, job_id: str, sessions: sessionmaker[Session]
) -> None:
    with sessions.begin() as session:
        other = Client(api_url, create_key(session=session, tenant="someone-else"))
    for method, path in (
        ("GET", f"/v1/jobs/{job_id}"),
        ("GET", f"/v1/jobs/{job_id}/results"),
        ("POST", f"/v1/jobs/{job_id}/cancel"),
    ):
        response = other.http.request(method, path)
        assert response.status_code == 404, (method, path, response.text)
        assert response.json()["error"]["code"] == "not_found"
    assert job_id not in {job["id"] for job in other.jobs()["data"]}


def test_revoked_key_gets_401_at_once(api_url: str, sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session:
        key = create_key(session=session, tenant="revoked-tenant")
    client = Client(api_url, key)
    assert client.http.get("/v1/jobs").status_code == 200
    with sessions.begin() as session:
        assert revoke_key(session=session, prefix=key.split("_")[1]) == 1
    assert client.http.get("/v1/jobs").status_code == 401
