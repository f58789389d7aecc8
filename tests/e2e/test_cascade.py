"""The confidence cascade end to end: the tiny model answers first on the GPU worker, and the
documents under the threshold are asked again on the stand-in managed API (or on another alias the
worker hosts), within the caps, in the shard's own commit: one row per document, both answers."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from postroom.db.models import Result, Shard
from postroom_cli.client import Client
from postroom_cli.standin import StandinServer
from tests.helpers import LABELS, make_docs, wait_for_status

pytestmark = pytest.mark.usefixtures("worker")
SHARD = 100  # the test settings' POSTROOM_SHARD_SIZE


@pytest.fixture(autouse=True)
def _clean_standin(standin: StandinServer) -> Iterator[None]:
    standin.set_faults()
    yield
    standin.set_faults()


def _run(client: Client, docs: list[dict[str, Any]], cascade: dict[str, Any]) -> dict[str, Any]:
    body = {"labels": LABELS, "model": "tiny", "documents": docs, "cascade": cascade}
    response = client.http.post("/v1/jobs", json=body)
    assert response.status_code == 201, response.text
    job = wait_for_status(client, response.json()["id"], timeout=300)
    assert job["status"] == "completed", job
    return job


def _first_confidence(line: dict[str, Any]) -> float:
    return float((line.get("first") or line)["confidence"])


def test_escalates_the_least_confident_under_the_threshold_within_the_share(
    client: Client, standin: StandinServer, sessions: sessionmaker[Session]
) -> None:
    # Given 250 documents (shards of 100, 100, 50) and a cascade below 0.9, at most a quarter
    # of each shard
    docs = make_docs(250, seed=20)
    job = _run(client, docs, {"below": 0.9, "model": "spill", "max_share": 0.25})
    lines = list(client.results(job["id"]))
    # Then one line per document, in input order
    assert [line["id"] for line in lines] == [d["id"] for d in docs]
    escalated = {line["id"] for line in lines if "first" in line}
    expected: set[str] = set()
    under_total = 0
    for start in range(0, len(docs), SHARD):
        shard = lines[start : start + SHARD]
        under = sorted(
            (_first_confidence(line), i)
            for i, line in enumerate(shard)
            if _first_confidence(line) < 0.9
        )
        under_total += len(under)
        cap = math.floor(0.25 * len(shard))
        expected |= {shard[i]["id"] for _, i in under[:cap]}
    # exactly the least confident documents under the threshold, up to each shard's cap
    assert escalated == expected
    assert 0 < len(escalated) < len(docs)
    for line in lines:
        if line["id"] in escalated:
            assert (line["route"], line["model"]) == ("spill", "standin"), line
            assert (line["first"]["route"], line["first"]["model"]) == ("gpu", "tiny"), line
            assert line["first"]["label"] in LABELS
            assert line["confidence"] == pytest.approx(0.9)  # the stand-in's answer
        else:
            assert line["route"] == "gpu", line
            assert "first" not in line, line
        assert "escalation_error" not in line
    # And each escalated document was asked once, no other was
    asked = [c.document for c in standin.calls()]
    texts = {d["id"]: d["text"] for d in docs}
    assert sorted(asked) == sorted(texts[i] for i in escalated)

    # The job shows escalations, agreement between the routes and their spend
    cascade = job["cascade"]
    agreed = sum(1 for line in lines if "first" in line and line["first"]["label"] == line["label"])
    assert cascade == {
        **cascade,
        "escalated": len(escalated),
        "failed": 0,
        "agreed": agreed,
        "capped": under_total - len(escalated),
        "agreement": round(agreed / len(escalated), 4),
    }
    assert job["counts"]["succeeded"] == len(docs)
    spend = job["spend"]
    assert spend["gpu"]["docs"] == len(docs)
    assert spend["spill"]["docs"] == len(escalated)
    assert spend["spill"]["cost"] == pytest.approx(cascade["cost"], abs=1e-6)
    assert spend["total"] == pytest.approx(spend["gpu"]["cost"] + spend["spill"]["cost"], abs=2e-6)
    # (the total is rounded to 6 decimals, $ per 1,000 docs is not)
    assert spend["per_1000_docs"] == pytest.approx(spend["total"] / len(docs) * 1000, abs=1e-5)
    # Every token is counted once: the rows hold both routes' tokens of their document
    with sessions() as session:
        rows_in = session.scalar(
            select(func.sum(Result.tokens_in)).where(Result.job_id == job["id"])
        )
    assert rows_in == spend["gpu"]["tokens_in"] + spend["spill"]["tokens_in"]
    assert spend["spill"]["tokens_in"] > 0


def test_the_cost_cap_keeps_the_first_answers(
    client: Client, standin: StandinServer, sessions: sessionmaker[Session]
) -> None:
    # Given a cascade with no money to spend
    job = _run(client, make_docs(60, seed=21), {"below": 0.9, "max_cost": 0})
    lines = list(client.results(job["id"]))
    # Then nothing was escalated, and what the cap left out is counted
    assert all(line["route"] == "gpu" and "first" not in line for line in lines)
    assert standin.calls() == []
    under = sum(1 for line in lines if line["confidence"] < 0.9)
    assert job["cascade"]["escalated"] == 0
    assert job["cascade"]["capped"] == under > 0
    assert "spill" not in job["spend"]
    with sessions() as session:
        capped = session.scalar(
            select(func.sum(Shard.cascade_capped)).where(Shard.job_id == job["id"])
        )
    assert capped == under


def test_a_cascade_to_another_alias_on_the_same_worker(client: Client) -> None:
    # Given a cascade from tiny (generative) to minilm (embedding), both hosted by the worker
    job = _run(client, make_docs(30, seed=22), {"below": 0.9, "model": "minilm"})
    lines = list(client.results(job["id"]))
    escalated = [line for line in lines if "first" in line]
    # Then the documents under the threshold carry minilm's answer and tiny's first answer
    assert len(escalated) == sum(1 for line in lines if _first_confidence(line) < 0.9) > 0
    for line in escalated:
        assert (line["route"], line["model"]) == ("gpu", "minilm"), line
        assert line["first"]["model"] == "tiny"
        assert set(line["distribution"]) == set(LABELS)
    assert job["cascade"]["route"] == "gpu"
    assert job["spend"]["gpu"]["docs"] == 30 + len(escalated)
    assert job["spend"]["per_1000_docs"] == pytest.approx(
        job["spend"]["total"] / 30 * 1000, abs=5e-5
    )


def test_a_failed_escalation_keeps_the_first_answer_and_says_why(
    client: Client, standin: StandinServer
) -> None:
    # Given a managed API that answers every call with a 500 (5 documents: the circuit
    # breaker, shared by the worker process, stays closed for the tests after this one)
    standin.set_faults(error_rate=1.0)
    job = _run(client, make_docs(5, seed=23), {"below": 0.99})
    lines = list(client.results(job["id"]))
    # Then every document has its first answer, no error, and the escalation's failure
    assert len(lines) == 5
    for line in lines:
        assert line["route"] == "gpu"
        assert line["label"] in LABELS
        assert line["error"] is None
        assert "first" not in line
        assert line["escalation_error"].startswith("escalation_failed: managed API unavailable")
    assert job["counts"]["succeeded"] == 5
    assert job["cascade"]["escalated"] == job["cascade"]["failed"] == 5
    assert job["cascade"]["agreement"] is None
