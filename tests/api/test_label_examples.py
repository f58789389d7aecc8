"""Few-shot labels over HTTP: examples and label_template are kept with the job; broken limits
are a 422 naming the label and the fix (no worker needed: nothing runs)."""

from __future__ import annotations

import json

from postroom_cli.client import Client
from tests.helpers import make_docs

LABELS = [
    {"name": "positive review", "examples": ["A joy from start to finish."]},
    {"name": "negative review", "examples": ["Two hours I will never get back."]},
    "plot summary",
]


def test_examples_and_template_are_kept_with_the_job(client: Client) -> None:
    body = {
        "labels": LABELS,
        "documents": make_docs(2),
        "model": "minilm",
        "label_template": "A {name}.",
    }
    response = client.http.post("/v1/jobs", json=body)
    assert response.status_code == 201, response.text
    job = response.json()
    assert job["labels"][0]["examples"] == ["A joy from start to finish."]
    assert job["labels"][2] == {"name": "plot summary", "description": None, "examples": None}
    client.http.post(f"/v1/jobs/{job['id']}/cancel")


def test_too_many_or_too_long_examples_name_the_label(client: Client) -> None:
    too_many = {"name": "positive review", "examples": [f"great {i}" for i in range(21)]}
    too_long = {"name": "negative review", "examples": ["x" * 1001]}
    body = {"labels": [too_many, too_long], "documents": make_docs(1)}
    response = client.http.post("/v1/jobs", json=body)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "invalid_labels"
    reasons = [d["reason"] for d in error["details"]]
    assert any("'positive review' has 21 examples; the limit is 20" in r for r in reasons)
    assert any("'negative review' is 1001 characters; shorten it to 1000" in r for r in reasons)


def test_upload_takes_examples_and_refuses_a_template_without_name(client: Client) -> None:
    lines = "".join(json.dumps(d) + "\n" for d in make_docs(2)).encode()
    params = {"labels": json.dumps(LABELS), "model": "minilm", "label_template": "A review."}
    refused = client.http.post(
        "/v1/jobs/upload",
        params=params,
        content=lines,
        headers={"Content-Type": "application/x-ndjson"},
    )
    assert refused.status_code == 422
    assert "label_template" in refused.json()["error"]["message"]
    accepted = client.http.post(
        "/v1/jobs/upload",
        params={**params, "label_template": "A {name}."},
        content=lines,
        headers={"Content-Type": "application/x-ndjson"},
    )
    assert accepted.status_code == 201, accepted.text
    assert accepted.json()["labels"][1]["examples"] == ["Two hours I will never get back."]
    client.http.post(f"/v1/jobs/{accepted.json()['id']}/cancel")
