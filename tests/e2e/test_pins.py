"""Pinned weights: `postroom model pin` records the digest of an alias's files, jobs and their
results carry it, and a worker whose files changed after the pin refuses to start."""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from postroom.db.models import ModelPin, Result
from postroom.model_files import content_digest, is_digest
from postroom_cli.client import Client
from postroom_cli.local import postroom_command, stop
from tests.helpers import LABELS, make_docs, wait_for_status
from tests.stack import start_worker

pytestmark = pytest.mark.engine  # it starts `postroom worker` on vLLM itself

ALIAS = "pinned"  # a private copy of the tiny model (tests/conftest.py pinned_model_dir)


def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        postroom_command(*args), env=env, capture_output=True, text=True, timeout=280, check=False
    )


def test_pinned_digest_is_carried_and_altered_weights_refuse_to_start(
    client: Client,
    env: dict[str, str],
    logs_dir: Path,
    sessions: sessionmaker[Session],
    pinned_model_dir: Path,
) -> None:
    # Given the alias pinned: the row holds the digest of its files.
    pinned = run_cli(env, "model", "pin", ALIAS)
    assert pinned.returncode == 0, pinned.stderr[-3000:]
    digest = content_digest(pinned_model_dir)
    assert is_digest(digest)
    assert digest in pinned.stdout
    with sessions() as session:
        pin = session.get(ModelPin, ALIAS)
        assert pin is not None
        assert pin.digest == digest

    # When a job runs on it: the job and every result carry the digest as their revision.
    response = client.http.post(
        "/v1/jobs",
        json={"labels": LABELS, "documents": make_docs(20), "model": ALIAS, "spill": "never"},
    )
    assert response.status_code == 201, response.text
    job = response.json()
    assert job["revision"] == digest
    proc = start_worker(env, logs_dir / "worker-pinned.log", sessions, "--models", ALIAS)
    try:
        done = wait_for_status(client, job["id"])
    finally:
        stop(proc)
    assert done["status"] == "completed"
    assert {r["revision"] for r in client.results(job["id"])} == {digest}
    with sessions() as session:
        stored = set(
            session.scalars(
                select(Result.revision).where(Result.job_id == uuid.UUID(job["id"]))
            ).all()
        )
    assert stored == {digest}

    # When the weights change after the pin: a worker refuses to start, before Celery does,
    # naming the alias, the pinned digest and the one it found.
    weights = pinned_model_dir / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    refused = run_cli(env, "worker", "--models", ALIAS)
    assert refused.returncode == 3, refused.stdout[-3000:] + refused.stderr[-3000:]
    message = " ".join((refused.stdout + refused.stderr).split())
    assert f"'{ALIAS}' is pinned to {digest}" in message
    assert content_digest(pinned_model_dir) in message
    assert "celery@" not in refused.stdout + refused.stderr
