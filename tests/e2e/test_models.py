"""The model registry through the pipeline: one worker hosting an embedding and a generative alias,
results tagged with alias and revision, a registered alias accepted with or without a worker,
real labels from MiniLM."""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from postroom.db.models import Result
from postroom_cli.client import Client
from postroom_cli.evaluate import SAMPLE
from postroom_cli.local import postroom_command
from tests.helpers import LABELS, make_docs, wait_for_status

pytestmark = pytest.mark.usefixtures("worker")


def test_one_worker_serves_both_aliases_and_tags_results(
    client: Client, sessions: sessionmaker[Session]
) -> None:
    docs = make_docs(30)
    jobs = {}
    for model in ("tiny", "minilm"):
        response = client.http.post(
            "/v1/jobs", json={"labels": LABELS, "documents": docs, "model": model}
        )
        assert response.status_code == 201, response.text
        jobs[model] = response.json()
    assert jobs["minilm"]["mode"] == "embedding"
    assert jobs["tiny"]["mode"] == "generative"
    for model, job in jobs.items():
        done = wait_for_status(client, job["id"])
        assert done["status"] == "completed"
        assert done["counts"]["succeeded"] == 30
        lines = list(client.results(job["id"]))
        assert {(r["model"], r["revision"]) for r in lines} == {(model, job["revision"])}
        with sessions() as session:
            tags = set(
                session.execute(
                    select(Result.model, Result.revision).where(
                        Result.job_id == uuid.UUID(job["id"])
                    )
                ).all()
            )
        assert tags == {(model, job["revision"])}
    assert jobs["minilm"]["revision"] == "all-MiniLM-L6-v2@gt-0.1.0"


def test_a_registered_alias_no_worker_serves_is_accepted_and_waits(client: Client) -> None:
    response = client.http.post(
        "/v1/jobs",
        json={"labels": LABELS, "documents": make_docs(1), "model": "unserved", "spill": "never"},
    )
    assert response.status_code == 201, response.text
    job = response.json()
    assert job["status"] == "queued"
    assert job["status_detail"] == "waiting for a worker serving unserved"
    client.cancel(job["id"])


def test_an_alias_not_in_the_registry_is_refused_with_the_registry(client: Client) -> None:
    response = client.http.post(
        "/v1/jobs", json={"labels": LABELS, "documents": make_docs(1), "model": "nope"}
    )
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "unknown_model"
    assert set(error["details"][0]["registered"]) >= {"minilm", "tiny", "unserved"}


def test_mode_without_model_picks_a_served_alias_of_that_mode(client: Client) -> None:
    response = client.http.post(
        "/v1/jobs", json={"labels": LABELS, "documents": make_docs(2), "mode": "embedding"}
    )
    assert response.status_code == 201
    assert response.json()["model"] == "minilm"


def test_generative_job_warns_when_labels_share_a_first_token(client: Client) -> None:
    labels = ["order late", "order lost", "refund"]
    response = client.http.post(
        "/v1/jobs", json={"labels": labels, "documents": make_docs(3), "model": "tiny"}
    )
    assert response.status_code == 201
    (warning,) = response.json()["warnings"]
    assert "'order late', 'order lost'" in warning
    job = wait_for_status(client, response.json()["id"])
    assert job["counts"]["succeeded"] == 3
    assert {r["label"] for r in client.results(job["id"])} <= set(labels)


def test_eval_on_the_shipped_sample_gives_real_labels(
    api_url: str, tenant_key: str, env: dict[str, str], tmp_path: Path
) -> None:
    out = tmp_path / "eval.json"
    proc = subprocess.run(
        postroom_command(
            "eval",
            str(SAMPLE),
            "--model",
            "minilm",
            "--json",
            str(out),
            "--api-url",
            api_url,
            "--key",
            tenant_key,
        ),
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["total"] >= 600
    assert report["failed"] == 0
    assert report["accuracy"] >= 0.8, report
    assert report["macro_f1"] >= 0.8
    assert "confusion" in proc.stdout
