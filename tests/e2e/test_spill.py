"""Spill to a managed API: the router (`postroom beat`), a spill worker (`postroom worker --route
spill`) and the stand-in managed API, all real processes and servers on loopback."""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete, func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session, sessionmaker

from postroom.db.models import Shard, Worker
from postroom.keys import result_shard_key
from postroom.storage import Storage
from postroom_cli.client import Client
from postroom_cli.local import postroom_command, spawn, stop
from postroom_cli.standin import StandinServer
from tests.helpers import LABELS, make_docs, wait_for_status, write_jsonl
from tests.waiting import wait_until

pytestmark = pytest.mark.usefixtures("worker")
DEAD = "unserved"  # a registry alias whose only GPU worker died an hour ago


@pytest.fixture(scope="module", autouse=True)
def spill_processes(
    env: dict[str, str], logs_dir: Path, sessions: sessionmaker[Session]
) -> Iterator[None]:
    with sessions.begin() as session:
        session.execute(
            insert(Worker).values(
                name="gpu@dead-host:1",
                route="gpu",
                models=[DEAD],
                stats={},
                heartbeat_at=datetime.now(UTC) - timedelta(hours=1),
            )
        )
    beat = spawn(postroom_command("beat"), env=env, log=logs_dir / "beat.log")
    spill = spawn(
        postroom_command("worker", "--route", "spill", "--concurrency", "4"),
        env=env,
        log=logs_dir / "spill.log",
    )

    def spill_ready() -> bool:
        with sessions() as session:
            return bool(
                session.scalar(
                    select(func.count()).select_from(Worker).where(Worker.route == "spill")
                )
            )

    wait_until(spill_ready, timeout=60, what="spill worker registered", alive=spill)
    yield
    stop(spill)
    stop(beat)
    with sessions.begin() as session:
        session.execute(delete(Worker).where(Worker.name == "gpu@dead-host:1"))


@pytest.fixture(autouse=True)
def _no_faults(standin: StandinServer) -> Iterator[None]:
    standin.set_faults()
    yield
    standin.set_faults()


def _submit(client: Client, tmp: Path, docs: list[dict[str, Any]], **params: Any) -> dict[str, Any]:
    path = write_jsonl(tmp / f"{uuid.uuid4().hex}.jsonl", docs)
    return client.upload(path, {"labels": ",".join(LABELS), **params})


def _routes(client: Client, job_id: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for line in client.results(job_id):
        counts[line["route"]] = counts.get(line["route"], 0) + 1
    return counts


def _s3_ids(storage: Storage, sessions: sessionmaker[Session], job_id: str) -> list[str]:
    with sessions() as session:
        shards = session.scalars(
            select(Shard.shard_no).where(Shard.job_id == uuid.UUID(job_id), Shard.state == "done")
        ).all()
    ids = []
    for shard_no in shards:
        body = storage.get_bytes(result_shard_key(uuid.UUID(job_id), shard_no))
        ids += [json.loads(line)["id"] for line in body.splitlines()]
    return ids


def test_no_gpu_worker_means_everything_spills(
    client: Client, tmp_path: Path, sessions: sessionmaker[Session]
) -> None:
    job = _submit(client, tmp_path, make_docs(2000), model=DEAD)
    assert job["estimate"]["docs"] == 2000
    assert job["estimate"]["spill"]["cost"] > 0
    done = wait_for_status(client, job["id"], timeout=240)
    assert done["status"] == "completed"
    assert done["counts"]["succeeded"] == 2000
    assert done["counts"]["spilled"] == 2000
    assert _routes(client, job["id"]) == {"spill": 2000}
    assert done["spend"]["spill"]["docs"] == 2000
    assert done["spend"]["spill"]["cost"] > 0
    assert done["spend"]["per_1000_docs"] > 0
    # The spill worker's heartbeat now reports what it finishes when full (the router plans
    # spill with it)
    wait_until(lambda: _spill_capacity(sessions) > 0, timeout=30, what="spill capacity reported")


def _spill_capacity(sessions: sessionmaker[Session]) -> float:
    with sessions() as session:
        stats = session.scalars(select(Worker.stats).where(Worker.route == "spill")).all()
    return sum(float((s.get("spill") or {}).get("capacity_docs_per_s") or 0) for s in stats)


def _docs_per_s(job: dict[str, Any]) -> float:
    started = datetime.fromisoformat(job["started_at"])
    finished = datetime.fromisoformat(job["finished_at"])
    return int(job["counts"]["succeeded"]) / max((finished - started).total_seconds(), 0.1)


def test_a_slow_gpu_spills_the_marginal_shards_of_a_deadline_job(
    client: Client, tmp_path: Path, storage: Storage, sessions: sessionmaker[Session]
) -> None:
    """The router sends part of a job to spill, not all, because of its deadline. Whether the
    deadline is then met is a matter of speed on a machine shared with the rest of the suite
    (a 7.5 s deadline was missed by 0.5 s in CI), so it is measured where speed is measured:
    bench/load.py's deadline misses per load level."""
    # Given the router has measured both routes on warm-up jobs run side by side (the same
    # contention as the job below; engine speed varies several-fold between machines) …
    gpu_warm = _submit(client, tmp_path, make_docs(600, seed=3))
    spill_warm = _submit(client, tmp_path, make_docs(600, seed=13), spill="always")
    gpu = _docs_per_s(wait_for_status(client, gpu_warm["id"]))
    spill = _docs_per_s(wait_for_status(client, spill_warm["id"]))
    # … a job the GPU alone would finish a quarter late at least, that both routes together
    # finish with room to spare
    n = 3000
    deadline = min(1.5 * n / (gpu + spill), 0.8 * n / gpu)
    docs = make_docs(n, seed=4)
    job = _submit(client, tmp_path, docs, deadline=f"{deadline:.1f}")
    done = wait_for_status(client, job["id"], timeout=240 + 2 * deadline)
    routes = _routes(client, job["id"])
    measured = {"gpu_docs_per_s": gpu, "spill_docs_per_s": spill, "deadline_s": deadline}
    # Then part of it (not all) spilled: an `auto` job whose GPU is alive spills only for its
    # deadline, and only what the GPU would not finish by it
    assert done["status"] == "completed"
    assert set(routes) == {"gpu", "spill"}, (routes, measured)
    assert 0 < routes["spill"] < n
    assert sum(routes.values()) == n
    assert done["counts"]["spilled"] == routes["spill"]
    ids = _s3_ids(storage, sessions, job["id"])
    assert sorted(ids) == sorted(d["id"] for d in docs)  # every document once, across routes


def test_retry_after_is_honoured(client: Client, tmp_path: Path, standin: StandinServer) -> None:
    standin.set_faults(rate_limit_first=5, retry_after=2)
    job = _submit(client, tmp_path, make_docs(200, seed=5), spill="always")
    done = wait_for_status(client, job["id"], timeout=120)
    assert done["counts"]["succeeded"] == 200
    calls = standin.calls()
    limited = [c for c in calls if c.status == 429]
    assert len(limited) == 5
    # The retry of each rate-limited request waits Retry-After …
    for c in limited:
        retry = min(x.arrived for x in calls if x.document == c.document and x.arrived > c.arrived)
        assert retry >= c.finished + 2.0 - 0.05
    # … and so does the whole process: past requests already on the wire, nothing is sent in
    # the Retry-After window.
    first = min(c.finished for c in limited)
    assert not [c for c in calls if first + 0.3 < c.arrived < first + 1.95]


def test_server_errors_are_retried(client: Client, tmp_path: Path, standin: StandinServer) -> None:
    standin.set_faults(error_rate=0.3, malformed_body_rate=0.1)
    job = _submit(client, tmp_path, make_docs(300, seed=6), spill="always")
    done = wait_for_status(client, job["id"], timeout=180)
    assert done["counts"]["succeeded"] == 300
    assert any(c.status == 500 for c in standin.calls())


def _spill_breakers(sessions: sessionmaker[Session]) -> list[bool]:
    """What the live spill workers' heartbeats say of their circuit breakers (the router reads
    this to decide whether spill can take work)."""
    since = datetime.now(UTC) - timedelta(seconds=5)
    with sessions() as session:
        stats = session.scalars(
            select(Worker.stats).where(Worker.route == "spill", Worker.heartbeat_at >= since)
        ).all()
    return [bool(s["spill"]["breaker_open"]) for s in stats if "spill" in s]


@pytest.mark.parametrize("fault", [{"error_rate": 1.0}, {"unauthorized": True}], ids=["500", "401"])
def test_a_failing_managed_api_shows_in_the_spill_workers_heartbeat(
    client: Client,
    tmp_path: Path,
    standin: StandinServer,
    sessions: sessionmaker[Session],
    fault: dict[str, Any],
) -> None:
    assert _spill_breakers(sessions) == [False]
    # Given the managed API answers every call with a 500, or a 401 (a revoked key) …
    standin.set_faults(**fault)
    job = _submit(client, tmp_path, make_docs(200, seed=8), spill="always")
    # … the spill worker's breaker opens, and its heartbeat says so
    wait_until(lambda: _spill_breakers(sessions) == [True], timeout=90, what="breaker open")
    assert client.job(job["id"])["counts"]["succeeded"] == 0
    # When it answers again, the job completes (nothing was lost meanwhile) and the breaker closes
    standin.set_faults()
    done = wait_for_status(client, job["id"], timeout=180)
    assert done["counts"]["succeeded"] == 200
    wait_until(lambda: _spill_breakers(sessions) == [False], timeout=60, what="breaker closed")


def test_a_document_the_managed_api_rejects_fails_alone_with_its_reason(
    client: Client, tmp_path: Path, standin: StandinServer
) -> None:
    standin.set_faults(reject_marker="TOOLONG")
    docs = make_docs(40, seed=9)
    docs[5]["text"] += " TOOLONG"
    job = _submit(client, tmp_path, docs, spill="always")
    done = wait_for_status(client, job["id"], timeout=120)
    # A 400 is about that request: the document fails with the endpoint's words, once asked
    assert done["counts"] == {**done["counts"], "succeeded": 39, "failed": 1}
    failed = {r["id"]: r["error"] for r in client.results(job["id"], only_failed=True)}
    assert list(failed) == [docs[5]["id"]]
    assert failed[docs[5]["id"]].startswith("rejected_by_managed_api: 400: ")
    assert "maximum context length" in failed[docs[5]["id"]]
    assert len([c for c in standin.calls() if "TOOLONG" in c.document]) == 1


def test_answers_outside_the_set_fail_after_one_retry(
    client: Client, tmp_path: Path, standin: StandinServer
) -> None:
    standin.set_faults(garbage_marker="GARBLE", outside_marker="OFFSCRIPT")
    docs = make_docs(60, seed=7)
    docs[3]["text"] += " GARBLE"
    docs[9]["text"] += " OFFSCRIPT"
    job = _submit(client, tmp_path, docs, spill="always")
    done = wait_for_status(client, job["id"], timeout=120)
    assert done["counts"] == {**done["counts"], "succeeded": 58, "failed": 2}
    failed = {r["id"]: r["error"] for r in client.results(job["id"], only_failed=True)}
    assert set(failed) == {docs[3]["id"], docs[9]["id"]}
    assert "unparseable" in failed[docs[3]["id"]]
    assert "is not one of the labels" in failed[docs[9]["id"]]
    asked = [c for c in standin.calls() if "GARBLE" in c.document or "OFFSCRIPT" in c.document]
    assert len(asked) == 4  # each asked exactly twice


def test_a_hanging_endpoint_never_holds_a_call_past_its_deadline(
    client: Client, tmp_path: Path, standin: StandinServer, settings: Any
) -> None:
    standin.set_faults(hang_first=8)
    job = _submit(client, tmp_path, make_docs(100, seed=8), spill="always")
    done = wait_for_status(client, job["id"], timeout=180)
    assert done["counts"]["succeeded"] == 100
    calls = standin.calls()
    # The stand-in never answers the first 8 calls; each document asked there was asked again
    # once the call deadline ran out (plus at most one backoff), so no worker waited longer.
    bound = settings.spill_call_deadline_seconds + settings.spill_backoff_max_seconds + 1.0
    for hung in calls[:8]:
        again = min(c.arrived for c in calls if c.document == hung.document and c is not hung)
        assert again - hung.arrived <= bound


def test_never_means_never_and_the_budget_holds(
    client: Client, tmp_path: Path, sessions: sessionmaker[Session]
) -> None:
    never = _submit(client, tmp_path, make_docs(300, seed=9), model=DEAD, spill="never")
    budget = 0.005  # about two shards of these documents at the stand-in's token counts
    capped = _submit(
        client, tmp_path, make_docs(1500, seed=10), model=DEAD, max_spill_cost=str(budget)
    )

    def held() -> bool:
        return bool(client.job(capped["id"])["router_note"])

    wait_until(held, timeout=90, what="the router held the capped job back")

    def spilled_done() -> dict[str, Any] | None:
        job = client.job(capped["id"])
        with sessions() as session:
            running = session.scalar(
                select(func.count())
                .select_from(Shard)
                .where(
                    Shard.job_id == uuid.UUID(capped["id"]),
                    Shard.queue == "spill",
                    Shard.state != "done",
                )
            )
        return job if job["counts"]["succeeded"] and not running else None

    job = wait_until(spilled_done, timeout=90, what="the spilled part finished")
    assert "max_spill_cost" in job["router_note"]
    assert 0 < job["counts"]["spilled"] < 1500
    assert job["spend"]["spill"]["cost"] <= budget
    with sessions() as session:
        queues = set(
            session.scalars(select(Shard.queue).where(Shard.job_id == uuid.UUID(never["id"])))
        )
    assert queues == {f"gpu.{DEAD}"}
    assert client.job(never["id"])["counts"]["spilled"] == 0
    for job_id in (never["id"], capped["id"]):
        client.cancel(job_id)


def test_spill_worker_command_exists() -> None:
    out = subprocess.run(
        postroom_command("worker", "--help"), capture_output=True, text=True, check=True
    ).stdout
    assert "--route" in out
