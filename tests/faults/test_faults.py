"""Nothing lost, nothing twice: each scenario breaks a real dependency mid-run and then checks that
every document of every accepted job has exactly one result (Postgres rows and S3 objects).

    make test                                         # CI size (part of the suite)
    .venv/bin/python -m pytest tests/faults --fault-size full --fault-report faults.json
"""

from __future__ import annotations

import collections
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from postroom.db.models import Result, Shard
from postroom_cli.local import postroom_command
from tests.faults.conftest import RAISES, SPILL_ONLY, FaultStack, Size
from tests.faults.harness import Supervised
from tests.faults.invariants import check
from tests.waiting import wait_until

REPORT: dict[str, Any] = {}


@pytest.fixture(scope="module", autouse=True)
def _report(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    path = request.config.getoption("--fault-report")
    if path:
        Path(path).write_text(json.dumps(REPORT, indent=2))


def _verify(stack: FaultStack, name: str, jobs: dict[uuid.UUID, set[str]], **extra: Any) -> None:
    started = extra.pop("started")
    for job_id in jobs:
        stack.wait_completed(job_id)
    verdict = check(
        sessions=stack.sessions,
        storage=stack.storage,
        expected=jobs,
        lease_seconds=stack.settings.lease_seconds,
    )
    REPORT[name] = {
        **verdict.counts(),
        "redeliveries": sum(_redeliveries(stack, job_id) for job_id in jobs),
        "restarts": stack.worker.restarts,
        **extra,  # a scenario's own counts win (e.g. the restarts of the worker it broke)
        "seconds": round(time.monotonic() - started, 1),
    }
    assert verdict.clean, {k: v[:10] for k, v in verdict.__dict__.items() if isinstance(v, list)}


def _redeliveries(stack: FaultStack, job_id: uuid.UUID) -> int:
    with stack.sessions() as session:
        attempts = session.scalars(select(Shard.attempt).where(Shard.job_id == job_id)).all()
    return sum(max(a - 1, 0) for a in attempts)


def test_worker_killed_mid_run(fault_stack: FaultStack, size: Size) -> None:
    started = time.monotonic()
    job_id, ids = fault_stack.submit(size.docs, seed=1)
    before = fault_stack.worker.restarts
    for k in range(size.kills):
        fault_stack.wait_progress(job_id, size.docs * (k + 1) // (size.kills + 2))
        fault_stack.worker.kill9()
        restarted = before + k + 1

        def restarted_enough(target: int = restarted) -> bool:
            return fault_stack.worker.restarts >= target

        wait_until(restarted_enough, timeout=30, what="supervisor restarted the worker")
        fault_stack.wait_worker_ready()
    _verify(
        fault_stack,
        "kill -9 worker",
        {job_id: ids},
        started=started,
        kills=size.kills,
    )


@pytest.mark.parametrize("how", ["restart empty", "flushall"])
def test_redis_loses_everything_mid_run(fault_stack: FaultStack, size: Size, how: str) -> None:
    started = time.monotonic()
    job_id, ids = fault_stack.submit(size.docs, seed=2 if how == "flushall" else 3)
    fault_stack.wait_progress(job_id, size.docs // 4)
    if how == "flushall":
        fault_stack.redis.flushall()
    else:
        fault_stack.redis.restart_empty()
    _verify(
        fault_stack,
        f"redis {how}",
        {job_id: ids},
        started=started,
    )


def test_postgres_restarted_mid_run(fault_stack: FaultStack, size: Size) -> None:
    started = time.monotonic()
    job_id, ids = fault_stack.submit(size.docs, seed=4)
    fault_stack.wait_progress(job_id, size.docs // 4)
    fault_stack.postgres.restart()
    _verify(
        fault_stack,
        "postgres restart",
        {job_id: ids},
        started=started,
    )


def test_s3_unreachable_mid_run(fault_stack: FaultStack, size: Size) -> None:
    started = time.monotonic()
    job_id, ids = fault_stack.submit(size.docs, seed=5)
    fault_stack.wait_progress(job_id, size.docs // 5)
    fault_stack.proxy.block()
    blocked_at = time.monotonic()
    try:
        wait_until(
            lambda: time.monotonic() - blocked_at >= size.s3_outage,
            timeout=120,
            what="S3 outage elapsed",
            interval=0.5,
        )
    finally:
        fault_stack.proxy.unblock()
    _verify(
        fault_stack,
        "S3 unreachable",
        {job_id: ids},
        started=started,
        outage_s=size.s3_outage,
    )


def test_paused_worker_cannot_commit_over_a_newer_attempt(fault_stack: FaultStack) -> None:
    started = time.monotonic()
    job_id, ids = fault_stack.submit(400, seed=6)

    def running_shard() -> int | None:
        with fault_stack.sessions() as session:
            return session.scalars(
                select(Shard.shard_no).where(Shard.job_id == job_id, Shard.state == "running")
            ).first()

    def pause_holding_a_shard() -> tuple[int] | None:
        # Pause first, then look: a shard seen running before the pause may finish before it.
        # (A tuple, so that shard 0 counts as found.)
        if running_shard() is None:
            return None
        fault_stack.worker.pause()
        shard = running_shard()
        if shard is None:
            fault_stack.worker.resume()
            return None
        return (shard,)

    try:
        [paused] = wait_until(
            pause_holding_a_shard, timeout=120, what="the worker paused holding a shard"
        )

        # Past its lease: the reaper expires the shard and rings its doorbell again.
        def expired() -> bool:
            with fault_stack.sessions() as session:
                state = session.scalar(
                    select(Shard.state).where(Shard.job_id == job_id, Shard.shard_no == paused)
                )
            return state == "expired"

        wait_until(expired, timeout=60, what="lease expired while the worker is paused")
    finally:
        fault_stack.worker.resume()
    _verify(fault_stack, "SIGSTOP past lease", {job_id: ids}, started=started)
    with fault_stack.sessions() as session:
        attempts = set(
            session.scalars(
                select(Result.attempt).where(Result.job_id == job_id, Result.shard_no == paused)
            )
        )
    # The paused attempt (1) lost the fence; only the newer attempt's results were committed.
    assert attempts == {2}
    log = fault_stack.worker.log.read_text(errors="replace")
    assert "lease lost before commit" in log


def test_poison_document_is_isolated(fault_stack: FaultStack) -> None:
    started = time.monotonic()
    job_id, ids = fault_stack.submit(200, poison_at=123, seed=7)
    _verify(
        fault_stack,
        "poison document",
        {job_id: ids},
        started=started,
    )
    failed = list(fault_stack.client.results(str(job_id), only_failed=True))
    assert [r["id"] for r in failed] == ["f7-000123"]
    assert failed[0]["error"].startswith("poison:")
    job = fault_stack.client.job(str(job_id))
    assert job["counts"] == {**job["counts"], "succeeded": 199, "failed": 1, "pending": 0}


def test_a_document_the_classifier_raises_on_is_isolated_and_says_why(
    fault_stack: FaultStack,
) -> None:
    started = time.monotonic()
    job_id, ids = fault_stack.submit(200, seed=11, marks={57: RAISES})
    _verify(fault_stack, "raising document", {job_id: ids}, started=started)
    failed = list(fault_stack.client.results(str(job_id), only_failed=True))
    assert [r["id"] for r in failed] == ["f11-000057"]
    # The attempts that raised were counted like crashes (the split found the document), and
    # its reason names what it raised rather than a crash
    assert failed[0]["error"].startswith("poison: this document raised ValueError: ")
    assert "cannot handle" in failed[0]["error"]
    job = fault_stack.client.job(str(job_id))
    assert job["counts"] == {**job["counts"], "succeeded": 199, "failed": 1, "pending": 0}
    # The worker said what it raised, and split the shard to find the document
    log = fault_stack.worker.log.read_text(errors="replace")
    assert "ValueError: fault injection" in log
    assert "split into" in log
    with fault_stack.sessions() as session:
        errors = session.scalars(
            select(Shard.error).where(Shard.job_id == job_id, Shard.error.is_not(None))
        ).all()
    assert any(e.startswith("ValueError: fault injection") for e in errors), errors


def test_a_broken_worker_gives_its_shards_back_instead_of_failing_them(
    fault_stack: FaultStack,
) -> None:
    """A worker that raises on every shard (a bad deploy) is not a poison document: counted like
    crashes, its failures would split the shards and fail every document as poison. Its
    self-check (a neutral document) raises too, so it gives its shards back uncounted and exits
    for its supervisor to restart it; a healthy worker then does the whole job."""
    started = time.monotonic()
    fault_stack.worker.pause()  # the healthy worker takes nothing meanwhile
    env = {
        **fault_stack.env,
        "POSTROOM_FAULT_BROKEN_WORKER": "true",
        "POSTROOM_WORKER_NULL_CLASSIFIER": "true",  # no engine: it restarts in seconds
    }
    log = fault_stack.root / "broken.log"
    broken = Supervised(postroom_command("worker"), env=env, log=log)
    try:
        job_id, ids = fault_stack.submit(200, seed=12)
        # Three exits: with its failures counted, two would have split every shard it took
        wait_until(lambda: broken.restarts >= 3, timeout=180, what="the broken worker exiting")
    finally:
        broken.stop()
        fault_stack.worker.resume()
    text = log.read_text(errors="replace")
    assert "this worker is broken" in text
    assert "self-check failed: RuntimeError: fault injection" in text
    with fault_stack.sessions() as session:
        shards = session.execute(
            select(Shard.attempt, Shard.releases).where(Shard.job_id == job_id)
        ).all()
    # It took shards and gave them all back; at most the one it held when stopped can count
    assert sum(attempt for attempt, _ in shards) >= 3
    assert sum(attempt - releases for attempt, releases in shards) <= 1
    _verify(fault_stack, "broken worker", {job_id: ids}, started=started, restarts=broken.restarts)
    job = fault_stack.client.job(str(job_id))
    assert job["counts"] == {**job["counts"], "succeeded": 200, "failed": 0, "pending": 0}


# A steady mix of managed-API faults for the whole run (shares of all calls, so they keep coming
# under load): 429 + Retry-After, 500s, bodies that are not JSON, slow answers, calls that never
# answer (the 2 s call deadline ends them), plus documents whose answer is garbage or out of set.
SPILL_FAULTS: dict[str, Any] = {
    "rate_limit_rate": 0.06,
    "retry_after": 0.5,
    "error_rate": 0.07,
    "malformed_body_rate": 0.04,
    "slow_rate": 0.05,
    "slow_seconds": 1.0,
    "hang_rate": 0.01,
    "hang_seconds": 6.0,
    "garbage_marker": "GARBLE",
    "outside_marker": "OFFSCRIPT",
}


def test_spill_route_under_managed_api_faults(fault_stack: FaultStack, size: Size) -> None:
    started = time.monotonic()
    spill = fault_stack.start_spill_worker()
    fault_stack.standin.set_faults(**SPILL_FAULTS)
    try:
        # Given a job for an alias no GPU worker serves, spill "always": every shard goes through
        # `postroom worker --route spill`; every 97th document gets an answer that is no label.
        marks = {
            i: ("GARBLE" if n % 2 else "OFFSCRIPT") for n, i in enumerate(range(40, size.docs, 97))
        }
        # With a cascade on: its frontier is the managed API the shards already run on, so
        # nothing is asked twice (test_cascade_under_managed_api_faults… escalates GPU work).
        cascade = json.dumps({"below": 0.99, "model": "spill"})
        options = {"model": SPILL_ONLY, "spill": "always", "cascade": cascade}
        job_id, ids = fault_stack.submit(size.docs, seed=8, marks=marks, options=options)
        # When the spill worker is killed once mid-run, with the faults still coming
        fault_stack.wait_progress(job_id, size.docs // 3)
        spill.kill9()
        wait_until(lambda: spill.restarts >= 1, timeout=30, what="supervisor restarted spill")
        fault_stack.wait_worker_ready(spill)
        fault_stack.wait_completed(job_id)
        calls = fault_stack.standin.calls()
    finally:
        fault_stack.standin.set_faults()
        spill.stop()
    injected = collections.Counter(c.fault for c in calls if c.fault)
    results = list(fault_stack.client.results(str(job_id)))
    failed = {r["id"]: r["error"] for r in results if r["error"]}
    name = "spill: managed API faults + kill -9"
    _verify(
        fault_stack,
        name,
        {job_id: ids},
        started=started,
        kills=1,
        restarts=spill.restarts,
        api_calls=len(calls),
        injected=dict(sorted(injected.items())),
        failed=len(failed),
    )
    # Then every document went the spill route and has one result; out-of-set answers are
    # per-document errors (asked twice), not lost and not a failed shard.
    assert collections.Counter(r["route"] for r in results) == {"spill": size.docs}
    assert not any("first" in r or "escalation_error" in r for r in results)
    assert set(failed) == {f"f8-{i:06d}" for i in marks}
    assert all(e.startswith("answer_not_a_label") for e in failed.values()), failed
    job = fault_stack.client.job(str(job_id))
    assert job["counts"] == {
        **job["counts"],
        "succeeded": size.docs - len(marks),
        "failed": len(marks),
        "spilled": size.docs,
        "pending": 0,
    }
    # Every kind of fault was injected under load, and the kill made the reaper hand shards back.
    kinds = {"rate_limit", "error", "malformed", "slow", "hang", "garbage", "outside"}
    assert set(injected) == kinds, injected
    assert REPORT[name]["redeliveries"] >= 1
    # A rate-limited document was never asked again before its Retry-After ran out (a 429 that
    # took near the call deadline to arrive may have found its caller gone: not checked).
    asked: dict[str, list[float]] = collections.defaultdict(list)
    for c in calls:
        asked[c.document].append(c.arrived)
    prompt = fault_stack.settings.spill_call_deadline_seconds / 2
    for c in calls:
        if c.fault == "rate_limit" and c.finished - c.arrived < prompt:
            again = [t for t in asked[c.document] if t > c.arrived]
            assert not again or min(again) >= c.finished + SPILL_FAULTS["retry_after"] - 0.05


def test_cascade_under_managed_api_faults_and_a_killed_gpu_worker(
    fault_stack: FaultStack, size: Size
) -> None:
    started = time.monotonic()
    fault_stack.standin.set_faults(**SPILL_FAULTS)
    try:
        # Given a job on the GPU worker's tiny model whose least confident half is asked again
        # on the managed API, while that API keeps failing in every way; every 97th document's
        # answer is no label (garbage or out of set)
        marks = {
            i: ("GARBLE" if n % 2 else "OFFSCRIPT") for n, i in enumerate(range(40, size.docs, 97))
        }
        cascade = {"below": 0.99, "model": "spill", "max_share": 0.5}
        job_id, ids = fault_stack.submit(
            size.docs, seed=9, marks=marks, options={"cascade": json.dumps(cascade)}
        )
        # When the GPU worker is killed once mid-run (escalations in flight with it)
        fault_stack.wait_progress(job_id, size.docs // 3)
        before = fault_stack.worker.restarts
        fault_stack.worker.kill9()
        wait_until(
            lambda: fault_stack.worker.restarts > before, timeout=30, what="worker restarted"
        )
        fault_stack.wait_worker_ready()
        fault_stack.wait_completed(job_id)
        calls = fault_stack.standin.calls()
    finally:
        fault_stack.standin.set_faults()
    name = "cascade: managed-API faults + kill -9 of the GPU worker"
    _verify(fault_stack, name, {job_id: ids}, started=started, kills=1, api_calls=len(calls))
    # Then every document has one successful result: the frontier's answer with the first kept,
    # or its first answer with the escalation's failure recorded
    results = list(fault_stack.client.results(str(job_id)))
    assert len(results) == size.docs
    assert all(r["error"] is None for r in results)
    escalated = [r for r in results if "first" in r]
    unlucky = [r for r in results if "escalation_error" in r]
    assert all(r["route"] == "spill" and r["first"]["route"] == "gpu" for r in escalated)
    assert all(r["route"] == "gpu" for r in unlucky)
    job = fault_stack.client.job(str(job_id))
    REPORT[name].update(escalated=len(escalated) + len(unlucky), escalation_failed=len(unlucky))
    assert job["cascade"]["escalated"] == len(escalated) + len(unlucky)
    assert job["cascade"]["failed"] == len(unlucky)
    # at most half of each shard, and the marked documents that were asked failed as data
    assert len(escalated) + len(unlucky) <= size.docs // 2
    assert len(escalated) > len(unlucky)
    marked = {f"f9-{i:06d}" for i in marks}
    assert all(r["id"] not in marked for r in escalated)
    assert all("answer_not_a_label" in r["escalation_error"] for r in unlucky if r["id"] in marked)
    assert job["spend"]["spill"]["docs"] == len(escalated) + len(unlucky)
