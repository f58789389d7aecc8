"""Patient spill through a provider's batch endpoint: the provider is a second Postroom deployment
on loopback (its own database, Redis key prefix, bucket, API and tiny-model worker), driven through
its OpenAI-compatible /v1/files and /v1/batches by this deployment's spill worker and beat."""

from __future__ import annotations

import secrets
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from openai import OpenAI
from pydantic import SecretStr
from sqlalchemy import select, text
from sqlalchemy.orm import Session, sessionmaker

from control.spill_batches import poll_batches
from postroom.costs import spill_cost
from postroom.db.migrate import migrate
from postroom.db.models import Result, SpillBatch, Worker
from postroom.db.session import make_engine, make_sessionmaker
from postroom.queue import make_celery
from postroom.settings import Settings
from postroom.storage import Storage
from postroom_cli.client import Client
from postroom_cli.local import postroom_command, settings_env, spawn, stop
from tests.faults.invariants import check
from tests.helpers import LABELS, make_docs, wait_for_status, write_jsonl
from tests.stack import new_key, spawn_api, stack_settings, start_worker, wait_api
from tests.waiting import wait_until

pytestmark = pytest.mark.engine  # the second deployment runs a vLLM worker
DEADLINE = str(48 * 3600)  # further than the 24 h completion window: the job is patient


@dataclass
class Remote:
    """The second Postroom: the provider whose batch endpoint this deployment spills to."""

    url: str
    key: str
    settings: Settings
    sessions: sessionmaker[Session]
    env: dict[str, str]
    logs: Path

    def sdk(self) -> OpenAI:
        return OpenAI(base_url=f"{self.url}/v1", api_key=self.key, max_retries=0)


@pytest.fixture(scope="module")
def remote(
    settings: Settings, tiny_model_dir: Path, standin: Any, logs_dir: Path
) -> Iterator[Remote]:
    name = f"postroom_remote_{secrets.token_hex(4)}"
    url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    migrate(url)
    remote_settings = stack_settings(
        database_url=url,
        broker_url=settings.broker_url,
        s3_endpoint=settings.s3_endpoint_url,
        s3_bucket=f"postroom-remote-{secrets.token_hex(3)}",
        tiny_model_dir=tiny_model_dir,
        standin_url=standin.url,
        broker_key_prefix=f"postroom-remote-{secrets.token_hex(4)}:",
        shard_size=100,
        worker_models=["tiny"],
        worker_metrics_port=0,
    )
    Storage(remote_settings).ensure_bucket()
    engine = make_engine(remote_settings)
    sessions = make_sessionmaker(engine)
    env = settings_env(remote_settings)
    logs = logs_dir / "remote"
    logs.mkdir(exist_ok=True)
    api, api_url = spawn_api(env=env, log=logs / "api.log")
    wait_api(api, api_url, log=logs / "api.log")
    yield Remote(api_url, new_key(sessions), remote_settings, sessions, env, logs)
    stop(api)
    engine.dispose()
    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def remote_worker(remote: Remote) -> Iterator[subprocess.Popen[bytes]]:
    """The provider's worker; started only by the test that wants its batches to finish."""
    proc = start_worker(
        remote.env, remote.logs / "worker.log", remote.sessions, "--concurrency", "4"
    )
    yield proc
    stop(proc)


@pytest.fixture(scope="module")
def batch_settings(settings: Settings, remote: Remote) -> Settings:
    return settings.model_copy(
        update={
            "spill_batch_base_url": f"{remote.url}/v1",
            "spill_batch_api_key": SecretStr(remote.key),
            "spill_batch_poll_seconds": 1.0,
        }
    )


@pytest.fixture(scope="module", autouse=True)
def patient_processes(
    env: dict[str, str],
    logs_dir: Path,
    sessions: sessionmaker[Session],
    remote: Remote,
) -> Iterator[None]:
    """This deployment's beat (router and batch poll) and spill worker, pointed at the remote's
    batch endpoint; one-document-at-a-time spill still goes to the stand-in."""
    patient = {
        **env,
        "POSTROOM_SPILL_BATCH_BASE_URL": f"{remote.url}/v1",
        "POSTROOM_SPILL_BATCH_API_KEY": remote.key,
        "POSTROOM_SPILL_BATCH_POLL_SECONDS": "1",
    }
    beat = spawn(postroom_command("beat"), env=patient, log=logs_dir / "batch-beat.log")
    spill = spawn(
        postroom_command("worker", "--route", "spill", "--concurrency", "4"),
        env=patient,
        log=logs_dir / "batch-spill.log",
    )

    def spill_ready() -> bool:
        with sessions() as session:
            names = session.scalars(select(Worker.name).where(Worker.route == "spill")).all()
        return any(n.endswith(f":{spill.pid}") for n in names)

    wait_until(spill_ready, timeout=60, what="spill worker registered", alive=spill)
    yield
    stop(spill)
    stop(beat)


def _submit(client: Client, tmp: Path, docs: list[dict[str, Any]]) -> str:
    path = write_jsonl(tmp / f"{uuid.uuid4().hex}.jsonl", docs)
    params = {"labels": ",".join(LABELS), "spill": "always", "deadline": DEADLINE}
    return str(client.upload(path, params)["id"])


def _batches(sessions: sessionmaker[Session], job_id: str) -> list[SpillBatch]:
    with sessions() as session:
        rows = list(
            session.scalars(select(SpillBatch).where(SpillBatch.job_id == uuid.UUID(job_id)))
        )
        session.expunge_all()
    return rows


def _routes(sessions: sessionmaker[Session], job_id: str) -> dict[str, int]:
    with sessions() as session:
        rows = session.scalars(select(Result.route).where(Result.job_id == uuid.UUID(job_id)))
        counts: dict[str, int] = {}
        for route in rows:
            counts[str(route)] = counts.get(str(route), 0) + 1
    return counts


def _exactly_once(
    sessions: sessionmaker[Session], storage: Storage, job_id: str, docs: list[dict[str, Any]]
) -> None:
    verdict = check(
        sessions=sessions,
        storage=storage,
        expected={uuid.UUID(job_id): {d["id"] for d in docs}},
        lease_seconds=60,
    )
    assert verdict.clean, verdict.counts()
    assert verdict.results == len(docs)


def test_an_expired_remote_batch_goes_back_and_its_shards_complete(
    client: Client,
    tmp_path: Path,
    sessions: sessionmaker[Session],
    storage: Storage,
    remote: Remote,
) -> None:
    # Given a patient job whose shards were submitted to the remote as batches (no remote worker
    # runs yet, so they wait there)
    docs = make_docs(150, seed=21, prefix="exp")
    job_id = _submit(client, tmp_path, docs)

    def submitted() -> list[SpillBatch] | None:
        rows = _batches(sessions, job_id)
        return rows if len(rows) == 2 and all(r.state == "submitted" for r in rows) else None

    rows = wait_until(submitted, timeout=120, what="both shards submitted as batches")
    remote_ids = [r.remote_batch_id for r in rows]
    assert all(remote_ids)
    assert client.job(job_id)["status"] == "running"

    # When the remote deployment expires them (moving expires_at stands in for waiting 24 h)
    with remote.sessions.begin() as session:
        for batch_id in remote_ids:
            assert batch_id is not None
            session.execute(
                text("UPDATE batches SET expires_at = now() - interval '1 second' WHERE id = :id"),
                {"id": uuid.UUID(hex=batch_id.removeprefix("batch_"))},
            )

    # Then the poll gives the shards back and the spill route finishes them one by one
    job = wait_for_status(client, job_id, timeout=180)
    assert job["status"] == "completed"
    assert job["counts"]["succeeded"] == len(docs)
    assert _routes(sessions, job_id) == {"spill": len(docs)}
    assert {r.state for r in _batches(sessions, job_id)} == {"returned"}
    sdk = remote.sdk()
    assert {sdk.batches.retrieve(b or "").status for b in remote_ids} == {"expired"}
    _exactly_once(sessions, storage, job_id, docs)


def test_a_patient_job_goes_through_the_remote_batch_endpoint(
    client: Client,
    tmp_path: Path,
    sessions: sessionmaker[Session],
    storage: Storage,
    remote: Remote,
    remote_worker: subprocess.Popen[bytes],
    batch_settings: Settings,
) -> None:
    # Given a patient job with spill: always
    docs = make_docs(150, seed=22, prefix="pat")

    # When it runs
    job_id = _submit(client, tmp_path, docs)
    job = wait_for_status(client, job_id, timeout=240)

    # Then both shards went through the remote's batch endpoint and were collected
    assert job["status"] == "completed"
    assert job["counts"]["succeeded"] == len(docs)
    assert job["counts"]["spilled"] == len(docs)
    assert _routes(sessions, job_id) == {"batch": len(docs)}
    rows = sorted(_batches(sessions, job_id), key=lambda r: r.shard_no)
    assert [r.state for r in rows] == ["collected", "collected"]
    sdk = remote.sdk()
    for row in rows:
        remote_batch = sdk.batches.retrieve(row.remote_batch_id or "")
        assert remote_batch.status == "completed"
        assert remote_batch.request_counts is not None
        assert remote_batch.request_counts.completed == (100 if row.shard_no == 0 else 50)
    labels = {line["label"] for line in client.results(job_id)}
    assert labels <= set(LABELS)
    # Spend: the batch route at the discount.
    batch = job["spend"]["batch"]
    full = spill_cost(batch_settings, tokens_in=batch["tokens_in"], tokens_out=batch["tokens_out"])
    assert batch["tokens_in"] > 0
    assert batch["cost"] == pytest.approx(full * 0.5, abs=1e-6)
    _exactly_once(sessions, storage, job_id, docs)

    # And polling a collected batch again rewrites nothing: the shard's fence refuses it
    with sessions.begin() as session:
        session.execute(
            text("UPDATE spill_batches SET state = 'submitted' WHERE job_id = :id"),
            {"id": uuid.UUID(job_id)},
        )
    report = poll_batches(
        sessions=sessions,
        storage=storage,
        settings=batch_settings,
        celery=make_celery(batch_settings),
    )
    # (the beat's own poll may get there first: either way the fence refuses the second commit)
    assert report.collected == 0
    wait_until(
        lambda: {r.state for r in _batches(sessions, job_id)} == {"superseded"},
        timeout=30,
        what="both re-polled batches superseded",
    )
    _exactly_once(sessions, storage, job_id, docs)
