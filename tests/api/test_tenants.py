"""Tenants stay apart on every route (jobs, files, batches, status, input_uri, Idempotency-Key);
keys are random, hashed, prefixed, revocable at once; admins see across tenants, and to everyone
else the admin routes answer exactly like routes that do not exist."""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from postroom.db.models import ApiKey, Tenant
from postroom.storage import Storage
from postroom.tenants import create_key, revoke_key
from postroom_cli.client import Client
from tests.helpers import LABELS, make_docs
from tests.stack import label_response_format

pytestmark = pytest.mark.usefixtures("worker")

BATCH_LINE = {
    "custom_id": "r1",
    "method": "POST",
    "url": "/v1/chat/completions",
    "body": {
        "model": "tiny",
        "messages": [{"role": "user", "content": "my invoice is wrong"}],
        "response_format": label_response_format("t", LABELS),
    },
}


def new_client(api_url: str, sessions: sessionmaker[Session], *, admin: bool = False) -> Client:
    with sessions.begin() as session:
        key = create_key(session=session, tenant=f"t-{uuid.uuid4().hex[:12]}", admin=admin)
    return Client(api_url, key)


def key_of(client: Client) -> str:
    return str(client.http.headers["authorization"]).removeprefix("Bearer ")


def tenant_name(sessions: sessionmaker[Session], key: str) -> str:
    digest = hashlib.sha256(key.encode()).hexdigest()
    with sessions() as session:
        return session.execute(
            select(Tenant.name)
            .join(ApiKey, ApiKey.tenant_id == Tenant.id)
            .where(ApiKey.key_hash == digest)
        ).scalar_one()


def not_found(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 404, (response.request.url, response.text)
    error: dict[str, Any] = response.json()["error"]
    assert error["code"] == "not_found"
    return error


@pytest.fixture
def other(api_url: str, sessions: sessionmaker[Session]) -> Client:
    return new_client(api_url, sessions)


@pytest.fixture
def admin(api_url: str, sessions: sessionmaker[Session]) -> Client:
    return new_client(api_url, sessions, admin=True)


def create_job(client: Client, **extra: Any) -> str:
    body = {"labels": LABELS, "documents": make_docs(3), **extra}
    response = client.http.post("/v1/jobs", json=body)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


# -- isolation


def test_other_tenant_gets_404_on_every_file_and_batch_route(client: Client, other: Client) -> None:
    upload = client.http.post(
        "/v1/files",
        files={"file": ("batch.jsonl", json.dumps(BATCH_LINE).encode() + b"\n")},
        data={"purpose": "batch"},
    )
    assert upload.status_code == 200, upload.text
    file_id = upload.json()["id"]
    created = client.http.post(
        "/v1/batches",
        json={
            "input_file_id": file_id,
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
        },
    )
    assert created.status_code == 200, created.text
    batch_id = created.json()["id"]
    for method, path, kwargs in (
        ("GET", f"/v1/files/{file_id}", {}),
        ("GET", f"/v1/files/{file_id}/content", {}),
        ("DELETE", f"/v1/files/{file_id}", {}),
        ("GET", "/v1/files", {"params": {"after": file_id}}),
        ("GET", f"/v1/batches/{batch_id}", {}),
        ("POST", f"/v1/batches/{batch_id}/cancel", {}),
        ("GET", "/v1/batches", {"params": {"after": batch_id}}),
        (
            "POST",
            "/v1/batches",
            {
                "json": {
                    "input_file_id": file_id,
                    "endpoint": "/v1/chat/completions",
                    "completion_window": "24h",
                }
            },
        ),
    ):
        not_found(other.http.request(method, path, **kwargs))
    assert other.http.get("/v1/files").json()["data"] == []
    assert other.http.get("/v1/batches").json()["data"] == []
    # The owner's file and batch are untouched by the other tenant's DELETE and cancel.
    assert client.http.get(f"/v1/files/{file_id}").status_code == 200
    assert client.http.get(f"/v1/batches/{batch_id}").json()["status"] != "cancelled"


def test_no_side_door_into_another_tenants_job(
    client: Client, other: Client, storage: Storage
) -> None:
    body = {"labels": LABELS, "documents": make_docs(3)}
    headers = {"Idempotency-Key": "shared-key"}
    mine = client.http.post("/v1/jobs", json=body, headers=headers).json()["id"]
    # The same Idempotency-Key and body from another tenant is another job, not a peek at mine.
    theirs = other.http.post("/v1/jobs", json=body, headers=headers)
    assert theirs.status_code == 201
    assert theirs.json()["id"] != mine
    # My input shards cannot be read back through input_uri.
    uri = f"s3://{storage.bucket}/inputs/{mine}/shard-000000.jsonl"
    response = other.http.post("/v1/jobs", json={"labels": LABELS, "input_uri": uri})
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "input_uri_not_allowed"
    # Nor through a page cursor, nor the status snapshot.
    page = client.http.get("/v1/jobs", params={"limit": 1}).json()
    assert page["data"][0]["id"] == mine
    their_ids = {j["id"] for j in other.jobs()["data"]}
    assert mine not in their_ids
    status = other.http.get("/v1/status")
    assert status.status_code == 200, status.text
    assert mine not in {j["id"] for j in status.json()["jobs"]}
    for path in (f"/v1/jobs/{mine}", f"/v1/jobs/{mine}/results", f"/v1/jobs/{mine}/cancel"):
        method = "POST" if path.endswith("cancel") else "GET"
        not_found(other.http.request(method, path))


# -- keys


def test_keys_are_random_hashed_prefixed_and_track_last_use(
    client: Client, sessions: sessionmaker[Session]
) -> None:
    key = key_of(client)
    match = re.fullmatch(r"pr_([0-9a-f]{8})_([A-Za-z0-9_-]{43})", key)
    assert match, key  # 32 random bytes after the public prefix
    prefix = match.group(1)
    with sessions() as session:
        row = session.execute(
            select(ApiKey).where(ApiKey.key_hash == hashlib.sha256(key.encode()).hexdigest())
        ).scalar_one()
        stored = {c.key: getattr(row, c.key) for c in ApiKey.__mapper__.column_attrs}
    assert row.prefix == prefix
    assert not any(key in str(value) or match.group(2) in str(value) for value in stored.values())
    assert client.http.get("/v1/jobs").status_code == 200
    with sessions() as session:
        last_used = session.get(ApiKey, row.id).last_used_at  # type: ignore[union-attr]
    assert last_used is not None


# -- admin


ADMIN_ROUTES = (
    ("GET", "/v1/admin/jobs"),
    ("GET", "/v1/admin/keys"),
    ("POST", "/v1/admin/keys/00000000/revoke"),
)


def test_admin_sees_every_tenant_page_by_page(
    admin: Client, client: Client, other: Client, sessions: sessionmaker[Session]
) -> None:
    mine, theirs = create_job(client), create_job(other)
    seen: dict[str, str] = {}
    cursor = None
    while len(seen) < 2 or cursor is None:
        params = {"limit": 1, **({"cursor": cursor} if cursor else {})}
        page = admin.http.get("/v1/admin/jobs", params=params)
        assert page.status_code == 200, page.text
        for job in page.json()["data"]:
            seen[job["id"]] = job["tenant"]
        cursor = page.json()["next_cursor"]
        if mine in seen and theirs in seen:
            break
    assert seen[mine] == tenant_name(sessions, key_of(client))
    assert seen[theirs] == tenant_name(sessions, key_of(other))
    only = admin.http.get("/v1/admin/jobs", params={"tenant": seen[theirs]}).json()["data"]
    assert [job["id"] for job in only] == [theirs]
    bad = admin.http.get("/v1/admin/jobs", params={"cursor": "nope"})
    assert bad.status_code == 422
    assert "cursor" in bad.json()["error"]["message"]


def test_admin_lists_keys_without_secrets(
    admin: Client, client: Client, sessions: sessionmaker[Session]
) -> None:
    key = key_of(client)
    name = tenant_name(sessions, key)
    client.http.get("/v1/jobs")  # last used: now
    response = admin.http.get("/v1/admin/keys", params={"tenant": name})
    assert response.status_code == 200, response.text
    (listed,) = response.json()["data"]
    assert set(listed) == {
        "prefix",
        "tenant_id",
        "tenant",
        "admin",
        "created_at",
        "last_used_at",
        "revoked_at",
    }
    assert listed["prefix"] == key.split("_")[1]
    assert listed["tenant"] == name
    assert listed["admin"] is False
    assert listed["last_used_at"] is not None
    assert listed["revoked_at"] is None
    assert key not in response.text
    assert hashlib.sha256(key.encode()).hexdigest() not in response.text


def test_admin_revokes_a_key_and_it_stops_at_once(admin: Client, client: Client) -> None:
    prefix = key_of(client).split("_")[1]
    assert client.http.get("/v1/jobs").status_code == 200
    response = admin.http.post(f"/v1/admin/keys/{prefix}/revoke")
    assert response.status_code == 200, response.text
    (revoked,) = response.json()["data"]
    assert revoked["revoked_at"] is not None
    refused = client.http.get("/v1/jobs")
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "unauthorized"
    again = admin.http.post(f"/v1/admin/keys/{prefix}/revoke")
    assert again.json()["data"][0]["revoked_at"] == revoked["revoked_at"]
    missing = not_found(admin.http.post("/v1/admin/keys/ffffffff/revoke"))
    assert "GET /v1/admin/keys" in missing["message"]
    bad = admin.http.post("/v1/admin/keys/NOT-HEX/revoke")
    assert bad.status_code == 422
    assert bad.json()["error"]["details"][0]["field"] == "prefix"


def test_admin_routes_look_like_no_route_to_everyone_else(
    api_url: str, client: Client, sessions: sessionmaker[Session]
) -> None:
    nothing = httpx.get(f"{api_url}/v1/no-such-route", headers=client.http.headers)
    expected = not_found(nothing)
    revoked_admin = new_client(api_url, sessions, admin=True)
    with sessions.begin() as session:
        revoke_key(session=session, prefix=key_of(revoked_admin).split("_")[1])
    callers = {
        "tenant key": dict(client.http.headers),
        "no key": {},
        "wrong key": {"Authorization": "Bearer pr_00000000_nope"},
        "revoked admin key": dict(revoked_admin.http.headers),
    }
    for who, headers in callers.items():
        for method, path in ADMIN_ROUTES:
            response = httpx.request(method, f"{api_url}{path}", headers=headers)
            assert not_found(response) == expected, (who, method, path)
    schema = httpx.get(f"{api_url}/openapi.json").json()
    assert not [path for path in schema["paths"] if "admin" in path]
