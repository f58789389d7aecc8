"""Inline jobs: validation errors in the one error body, idempotency, listing, cancel."""

from __future__ import annotations

import pytest

from postroom_cli.client import Client
from tests.helpers import LABELS, make_docs, wait_for_status

pytestmark = pytest.mark.usefixtures("worker")


def test_idempotency_key_same_body_same_job_other_body_409(client: Client) -> None:
    body = {"labels": LABELS, "documents": make_docs(5)}
    headers = {"Idempotency-Key": "batch-42"}
    first = client.http.post("/v1/jobs", json=body, headers=headers)
    again = client.http.post("/v1/jobs", json=body, headers=headers)
    assert first.status_code == 201
    assert again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    other = client.http.post("/v1/jobs", json={**body, "documents": make_docs(6)}, headers=headers)
    assert other.status_code == 409
    assert other.json()["error"]["code"] == "idempotency_key_reused"
    assert len(client.jobs()["data"]) == 1


def test_unknown_fields_and_bad_values_are_named(client: Client) -> None:
    response = client.http.post(
        "/v1/jobs", json={"labels": LABELS, "documents": make_docs(1), "colour": "red"}
    )
    assert response.status_code == 422
    assert response.json()["error"]["details"][0]["field"] == "colour"
    response = client.http.post(
        "/v1/jobs", json={"labels": LABELS, "documents": [{"id": "a", "text": 5}]}
    )
    assert response.status_code == 422
    detail = response.json()["error"]["details"][0]
    assert detail == {"line": 1, "field": "text", "reason": "must be a string, got int", "id": "a"}


def test_bad_label_sets_are_refused(client: Client) -> None:
    cases = {
        "at least 2": [],
        "at least 2 ": ["only"],
        "duplicate of labels[0]": ["Billing", "billing "],
        "empty label name": ["a", " "],
        "at most 1000": [f"l{i}" for i in range(1001)],
    }
    for needle, labels in cases.items():
        response = client.http.post("/v1/jobs", json={"labels": labels, "documents": make_docs(1)})
        assert response.status_code == 422, labels
        error = response.json()["error"]
        assert error["code"] == "invalid_labels"
        assert needle.strip() in " ".join(d["reason"] for d in error["details"])


def test_a_model_not_in_the_registry_is_refused_with_the_registry(client: Client) -> None:
    response = client.http.post(
        "/v1/jobs", json={"labels": LABELS, "documents": make_docs(1), "model": "gpt-9"}
    )
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "unknown_model"
    assert "tiny" in error["message"]
    assert "tiny" in error["details"][0]["registered"]


def test_list_pagination_and_bad_cursor(client: Client) -> None:
    ids = [
        client.http.post("/v1/jobs", json={"labels": LABELS, "documents": make_docs(1)}).json()[
            "id"
        ]
        for _ in range(3)
    ]
    page = client.http.get("/v1/jobs", params={"limit": 2}).json()
    assert [j["id"] for j in page["data"]] == ids[::-1][:2]
    rest = client.http.get("/v1/jobs", params={"limit": 2, "cursor": page["next_cursor"]}).json()
    assert [j["id"] for j in rest["data"]] == [ids[0]]
    assert rest["next_cursor"] is None
    bad = client.http.get("/v1/jobs", params={"cursor": "%%%"})
    assert bad.status_code == 422
    assert "cursor" in bad.json()["error"]["message"]


def test_unknown_and_malformed_job_ids(client: Client) -> None:
    assert client.http.get("/v1/jobs/00000000-0000-0000-0000-000000000000").status_code == 404
    response = client.http.get("/v1/jobs/not-a-uuid")
    assert response.status_code == 422
    assert response.json()["error"]["details"][0]["field"] == "job_id"


def test_cancel_keeps_finished_results(client: Client) -> None:
    body = client.http.post("/v1/jobs", json={"labels": LABELS, "documents": make_docs(3)}).json()
    job = wait_for_status(client, body["id"])
    cancelled = client.cancel(body["id"])
    # A finished job stays finished; its results stay.
    assert cancelled["status"] == job["status"] == "completed"
    assert len(list(client.results(body["id"]))) == 3
