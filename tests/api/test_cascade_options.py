"""A job's `cascade` is checked at submission: a bad one is a 422 naming what to fix, a good one
is resolved to its route and shown by GET /v1/jobs/{id}."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from postroom_cli.client import Client
from tests.helpers import LABELS, make_docs, write_jsonl


def _post(client: Client, cascade: Any, **extra: Any) -> Any:
    body = {"labels": LABELS, "model": "tiny", "documents": make_docs(3), "cascade": cascade}
    return client.http.post("/v1/jobs", json={**body, **extra})


@pytest.mark.parametrize(
    ("cascade", "field", "says"),
    [
        ({}, "cascade.below", "Field required"),
        ({"below": 0}, "cascade.below", "greater than 0"),
        ({"below": 1.5}, "cascade.below", "less than or equal to 1"),
        ({"below": 0.7, "max_share": 0}, "cascade.max_share", "greater than 0"),
        ({"below": 0.7, "max_share": 1.2}, "cascade.max_share", "less than or equal to 1"),
        ({"below": 0.7, "max_cost": -1}, "cascade.max_cost", "greater than or equal to 0"),
        ({"below": 0.7, "above": 0.2}, "cascade.above", "Extra inputs are not permitted"),
        ({"below": 0.7, "model": "gpt-17"}, "cascade.model", "neither 'spill'"),
        ({"below": 0.7, "model": "tiny"}, "cascade.model", "the job's own model"),
        ("0.7", "cascade", "valid dictionary"),
    ],
)
def test_a_bad_cascade_is_a_422_naming_the_field(
    client: Client, cascade: Any, field: str, says: str
) -> None:
    response = _post(client, cascade)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["message"].startswith(field), error
    assert says in error["message"], error
    assert any(d.get("field") == field for d in error["details"]), error


def test_a_cascade_to_an_alias_lists_the_registry(client: Client) -> None:
    error = _post(client, {"below": 0.5, "model": "nope"}).json()["error"]
    assert "minilm" in error["message"]
    assert "minilm" in error["details"][0]["registered"]


def test_a_good_cascade_is_resolved_and_shown(client: Client) -> None:
    # Given a cascade to the managed API and one to another registry alias
    spill = _post(client, {"below": 0.8, "max_share": 0.2, "max_cost": 1.5})
    alias = _post(client, {"below": 0.6, "model": "minilm"}, mode=None)
    assert spill.status_code == 201, spill.text
    assert alias.status_code == 201, alias.text
    # Then the job shows what it asked, resolved to a route, with nothing escalated yet
    shown = client.job(spill.json()["id"])["cascade"]
    assert shown == {
        **shown,
        "below": 0.8,
        "route": "spill",
        "max_share": 0.2,
        "max_cost": 1.5,
        "escalated": 0,
        "agreement": None,
    }
    assert client.job(alias.json()["id"])["cascade"]["route"] == "gpu"
    assert client.job(alias.json()["id"])["cascade"]["model"] == "minilm"
    # And a job without one says so
    plain = client.http.post(
        "/v1/jobs", json={"labels": LABELS, "model": "tiny", "documents": make_docs(2)}
    )
    assert plain.json()["cascade"] is None


def test_upload_takes_cascade_as_a_json_field(client: Client, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "docs.jsonl", make_docs(3))
    params = {"labels": ",".join(LABELS), "model": "tiny"}
    job = client.upload(path, {**params, "cascade": json.dumps({"below": 0.9})})
    assert job["cascade"]["below"] == 0.9
    for bad, says in (("{below", "not valid JSON"), ("[0.9]", "must be a JSON object")):
        response = client.http.post(
            "/v1/jobs/upload",
            params={**params, "cascade": bad},
            content=path.read_bytes(),
            headers={"Content-Type": "application/x-ndjson"},
        )
        assert response.status_code == 422, response.text
        assert says in response.json()["error"]["message"]
