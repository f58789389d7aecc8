"""A job for a registered alias with no worker is accepted and waits, shows up as work waiting for
a worker, and completes once `postroom worker` starts; jobs waiting together run by the claim
policy (two deadline jobs sent in reverse order finish earliest deadline first)."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from postroom_cli.client import Client
from postroom_cli.local import stop
from tests.helpers import LABELS, make_docs, wait_for_status
from tests.stack import start_worker

pytestmark = pytest.mark.engine  # it starts `postroom worker` on vLLM itself

ALIAS = "scaled"  # in the registry; no worker serves it until this test starts one


def test_jobs_wait_for_a_worker_and_then_run_earliest_deadline_first(
    client: Client, env: dict[str, str], logs_dir: Path, sessions: sessionmaker[Session]
) -> None:
    # Given no worker serving the alias: both jobs are accepted, the later deadline first.
    jobs = {}
    for name, seconds in (("later", 600), ("sooner", 300)):
        response = client.http.post(
            "/v1/jobs",
            json={
                "labels": LABELS,
                "documents": make_docs(200, prefix=name),
                "model": ALIAS,
                "spill": "never",
                "deadline": seconds,
            },
        )
        assert response.status_code == 201, response.text
        jobs[name] = response.json()
        assert jobs[name]["status_detail"] == f"waiting for a worker serving {ALIAS}"
    status = client.http.get("/v1/status").json()
    queue = next(q for q in status["queues"] if q["queue"] == f"gpu.{ALIAS}")
    assert (queue["workers"], queue["documents"]) == (0, 400)
    metrics = client.http.get("/metrics").text
    assert f'postroom_queue_unserved_documents{{queue="gpu.{ALIAS}"}} 400.0' in metrics

    # When a worker for it starts (one shard at a time, so the order is strict):
    proc = start_worker(
        env, logs_dir / "worker-scaled.log", sessions, "--models", ALIAS, "--concurrency", "1"
    )
    try:
        done = {name: wait_for_status(client, job["id"]) for name, job in jobs.items()}
    finally:
        stop(proc)

    # Then both complete, the sooner deadline first although it was sent second.
    assert {job["status"] for job in done.values()} == {"completed"}
    assert all(job["counts"]["succeeded"] == 200 for job in done.values())
    finished = {name: datetime.fromisoformat(job["finished_at"]) for name, job in done.items()}
    assert finished["sooner"] < finished["later"]
    started = {name: datetime.fromisoformat(job["started_at"]) for name, job in done.items()}
    assert started["sooner"] < started["later"]
    assert done["later"]["status_detail"] is None
