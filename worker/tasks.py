"""Celery task bodies of `postroom worker`, kept thin: claim → read → classify → write → finish.

Safe to run twice: the claim in Postgres lets one delivery work a shard, the S3 result key is
derived from (job, shard) and overwritten, result rows are upserted on (job_id, doc_id), and the
finish is fenced on the attempt number so a worker that lost its lease cannot commit.
"""

from __future__ import annotations

import logging
import os
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from postroom.backlog import shard_admission
from postroom.cancelling import cancel_held
from postroom.domain import DocResult, JobSpec, JobStatus
from postroom.errors import EngineDeadError
from postroom.jobs import WorkOrder, work_order
from postroom.keys import input_shard_key, result_shard_key
from postroom.logs import bound
from postroom.metrics import SHARDS, observe_shard
from postroom.policy import ClaimContended, claim_best
from postroom.queue import TASK_CLASSIFY_SHARD, Celery, Task
from postroom.results import result_line, upsert_results
from postroom.shards import (
    Claimed,
    claim_shard,
    finish_shard,
    mark_results_written,
    release_shard,
)
from postroom.storage import StorageError
from worker.batch_spill import submit_batch, wants_batch
from worker.cascade import CascadeOutcome, escalate
from worker.classifier import ModelNotHosted
from worker.label_check import check_labels
from worker.poison import fail_shard, split_poison_shard
from worker.runtime import Runtime, get_runtime
from worker.spill import SpillUnavailable

logger = logging.getLogger(__name__)

TRANSIENT = (
    ClaimContended,
    StorageError,
    OperationalError,
    ModelNotHosted,
    TimeoutError,
    SpillUnavailable,
)


def register_tasks(app: Celery) -> None:
    @app.task(name=TASK_CLASSIFY_SHARD, bind=True, acks_late=True, max_retries=None)
    def classify_shard(self: Task[Any, Any], job_id: str, shard_no: int) -> dict[str, Any]:
        """Classify one shard; see the module docstring for why a second run is harmless."""
        runtime = get_runtime()
        with bound(job_id=job_id, shard_no=shard_no, task_id=self.request.id, route=runtime.route):
            # The doorbell's queue: the claim takes the best shard of it (postroom.policy).
            queue = (self.request.delivery_info or {}).get("routing_key") or ""
            try:
                return run_shard(runtime, uuid.UUID(job_id), shard_no, celery=self.app, queue=queue)
            except EngineDeadError as e:
                logger.critical("%s; exiting so the supervisor restarts this worker", e)
                os._exit(70)
            except TRANSIENT as e:
                retries = self.request.retries or 0
                countdown = min(runtime.settings.retry_backoff_max_seconds, 2**retries)
                countdown = countdown * (0.5 + random.random())
                logger.warning("shard failed transiently (%s); retrying in %.1fs", e, countdown)
                raise self.retry(exc=e, countdown=countdown) from e


def run_shard(
    runtime: Runtime, job_id: uuid.UUID, shard_no: int, *, celery: Celery, queue: str = ""
) -> dict[str, Any]:
    """A doorbell means "a shard of this queue waits": claim the best one by policy.

    Admission first, claim second: a shard under suspicion (it was in flight when a worker
    died, or it is a part of a split) is claimed only by name, from a message naming it, and
    runs alone in this worker: nothing else is even claimed meanwhile, so a crash while it runs
    is pinned on it and on no other shard. Any other message claims by policy (postroom.policy).
    """
    with runtime.sessions() as session:
        peek = shard_admission(session=session, job_id=job_id, shard_no=shard_no)
    if peek is not None and peek.claimable and not queue:
        queue = peek.queue
    suspect = peek is not None and (
        peek.attempt - peek.releases > 0 or shard_no >= peek.shard_count
    )
    if peek is not None and peek.claimable and suspect:
        with runtime.admission(exclusive=True):
            return _run_admitted(runtime, lambda: _claim(runtime, job_id, shard_no), celery=celery)
    if not queue:
        logger.warning("no such shard and no queue: the message is stale")
        return {"claimed": False}
    with runtime.admission(exclusive=False):
        return _run_admitted(runtime, lambda: _claim_best(runtime, queue), celery=celery)


@dataclass
class ShardRun:
    """One claimed shard on its way through this worker, and where its time went."""

    job_id: uuid.UUID
    shard_no: int
    claimed: Claimed
    order: WorkOrder
    marks: dict[str, float] = field(default_factory=lambda: {"started": time.monotonic()})
    results: list[DocResult] = field(default_factory=list)
    cascade: CascadeOutcome | None = None

    def mark(self, step: str) -> None:
        self.marks[step] = time.monotonic()

    @property
    def spec(self) -> JobSpec:
        return self.order.spec

    @property
    def fence(self) -> dict[str, Any]:
        """The keyword arguments of every fenced call on this shard: which one, which attempt."""
        return {"job_id": self.job_id, "shard_no": self.shard_no, "attempt": self.claimed.attempt}


def _run_admitted(
    runtime: Runtime, claim: Callable[[], ShardRun | None], *, celery: Celery
) -> dict[str, Any]:
    run = claim()
    if run is None:
        logger.info("nothing claimable (done, running elsewhere or cancelled): no-op")
        return {"claimed": False}
    # The shard claimed, which need not be the one the message named.
    with bound(job_id=str(run.job_id), shard_no=run.shard_no):
        return _work(runtime, run, celery=celery)


def _work(runtime: Runtime, run: ShardRun, *, celery: Celery) -> dict[str, Any]:
    job_id, shard_no = run.job_id, run.shard_no
    if run.order.status == JobStatus.cancelled:
        return _cancelled(runtime, run)
    try:  # held since the claim (_claimed)
        docs = list(runtime.storage.iter_jsonl(input_shard_key(job_id, shard_no)))
        run.mark("read")
        # Attempts are counted at claim time, so a worker that crashed on this shard counted too.
        limit = (
            runtime.settings.max_attempts
            if shard_no < run.order.shard_count
            else runtime.settings.split_max_attempts
        )
        if run.claimed.crashes >= limit and len(docs) > 1:
            return split_poison_shard(runtime, run, docs, celery)
        if (
            run.claimed.crashes < limit
            and wants_batch(runtime, run)
            and submit_batch(runtime, run, docs)
        ):
            return {"claimed": True, "committed": False, "batched": True}
        run.results = _classify(runtime, run, docs, poison=run.claimed.crashes >= limit)
        run.mark("classified")
        if not _commit(runtime, run, docs):
            return {"claimed": True, "committed": False}
        _write_results(runtime, run)
    except TRANSIENT:
        _release(runtime, run)
        raise
    except EngineDeadError:
        raise  # the process exits; the lease runs out and the reaper hands the shard on
    except Exception as e:
        fail_shard(runtime, run, e, celery)
        raise
    finally:
        runtime.drop(job_id, shard_no)
    return _done(runtime, run)


def _claim(runtime: Runtime, job_id: uuid.UUID, shard_no: int) -> ShardRun | None:
    def claim(session: Session) -> tuple[uuid.UUID, int, Claimed] | None:
        claimed = claim_shard(
            session=session,
            job_id=job_id,
            shard_no=shard_no,
            worker=runtime.name,
            lease_seconds=runtime.settings.lease_seconds,
            route=runtime.route,
        )
        return None if claimed is None else (job_id, shard_no, claimed)

    return _claimed(runtime, claim)


def _claim_best(runtime: Runtime, queue: str) -> ShardRun | None:
    def claim(session: Session) -> tuple[uuid.UUID, int, Claimed] | None:
        return claim_best(
            session=session,
            queue=queue,
            worker=runtime.name,
            lease_seconds=runtime.settings.lease_seconds,
            route=runtime.route,
            settings=runtime.settings,
            prefer=runtime.jobs_in_hand(),
        )

    return _claimed(runtime, claim)


def _claimed(
    runtime: Runtime, claim: Callable[[Session], tuple[uuid.UUID, int, Claimed] | None]
) -> ShardRun | None:
    """Claim and hold as one step, so a worker giving its shards back before it exits
    (worker/self_check.py) sees every shard it claimed; a closing worker claims nothing."""
    started = time.monotonic()
    with runtime.claiming() as open_:
        if not open_:
            return None
        with runtime.sessions.begin() as session:
            got = claim(session)
            if got is None:
                return None
            job_id, shard_no, claimed = got
            order = work_order(session=session, job_id=job_id)
        runtime.hold(job_id, shard_no, claimed.attempt)
    run = ShardRun(job_id, shard_no, claimed, order, marks={"started": started})
    run.mark("claimed")
    return run


def _classify(
    runtime: Runtime, run: ShardRun, docs: list[dict[str, Any]], *, poison: bool
) -> list[DocResult]:
    if poison:
        what = (
            f"raised {run.claimed.error}"
            if run.claimed.error
            else f"crashed or hung the worker {run.claimed.crashes} time(s)"
        )
        reason = f"poison: this document {what}; it was isolated from its shard and skipped"
        return [DocResult(id=str(d["id"]), error=reason) for d in docs]
    assert runtime.classifier is not None
    marker = runtime.settings.fault_poison_marker
    if marker and any(marker in str(d["text"]) for d in docs):
        # Fault injection (tests only): this document "crashes the engine".
        raise EngineDeadError("fault injection: poison document")
    marker = runtime.settings.fault_raise_marker
    if marker and any(marker in str(d["text"]) for d in docs):
        # Fault injection (tests only): a document the classifier cannot handle.
        raise ValueError("fault injection: a document the classifier cannot handle")
    shard = f"{run.job_id}/{run.shard_no}"
    results = runtime.classifier.classify(job_id=run.job_id, spec=run.spec, shard=shard, docs=docs)
    results = check_labels(run.spec, results)
    if run.spec.cascade is not None:
        results, run.cascade = escalate(
            frontier=runtime.frontier(run.spec.cascade),
            settings=runtime.settings,
            job_id=run.job_id,
            shard=shard,
            spec=run.spec,
            route=runtime.route,
            total_docs=run.order.total_docs,
            docs=docs,
            results=results,
        )
    return results


def _commit(runtime: Runtime, run: ShardRun, docs: list[dict[str, Any]]) -> bool:
    """Result rows and the fenced finish in one transaction; False when the lease was lost."""
    results, spec, cascade = run.results, run.spec, run.cascade
    failed = sum(1 for r in results if r.error)
    # The shard's own route's tokens; the frontier's are counted apart (cascade_tokens_*).
    tokens_in = cascade.first_tokens_in if cascade else sum(r.tokens_in for r in results)
    tokens_out = cascade.first_tokens_out if cascade else sum(r.tokens_out for r in results)
    with runtime.sessions.begin() as session:
        # Rows first, the fenced finish last: finish_shard locks the job row to complete it,
        # and that lock is then held only for the moment before the commit, so shards of one
        # job finishing together do not queue behind each other's upserts.
        upsert_results(
            session=session,
            **run.fence,
            route=runtime.route,
            model=spec.model,
            revision=spec.revision,
            results=[(int(d["line"]), r) for d, r in zip(docs, results, strict=True)],
            job_created_at=run.order.created_at,
            part=run.order.part,
        )
        won = finish_shard(
            session=session,
            **run.fence,
            succeeded=len(results) - failed,
            failed=failed,
            route=runtime.route,
            tokens_in=tokens_in,
            tokens_out=tokens_out,
            cascade=cascade.columns() if cascade else None,
        )
        if not won:
            # Fenced out: roll back the rows written above with everything else.
            session.rollback()
            SHARDS.labels(runtime.route, "lease_lost").inc()
            logger.warning(
                "lease lost before commit (attempt %d): results discarded", run.claimed.attempt
            )
            return False
    run.mark("committed")
    return True


def _write_results(runtime: Runtime, run: ShardRun) -> None:
    """The S3 result object, after the fenced commit: only the attempt that won gets here, so a
    worker that lost its lease never overwrites it. A crash before it leaves the object to the
    reaper, which rebuilds it from the committed rows."""
    spec, cascade = run.spec, run.cascade
    observe_shard(
        settings=runtime.settings,
        route=runtime.route,
        model=spec.model,
        results=run.results,
        seconds=run.marks["committed"] - run.marks["started"],
        frontier=(
            (spec.cascade.route, spec.cascade.model, cascade.tokens_in, cascade.tokens_out)
            if cascade is not None and spec.cascade is not None
            else None
        ),
        cascade=cascade.outcomes() if cascade is not None else None,
    )
    lines = [
        result_line(r, route=runtime.route, model=spec.model, revision=spec.revision)
        for r in run.results
    ]
    runtime.storage.put_jsonl(result_shard_key(run.job_id, run.shard_no), lines)
    with runtime.sessions.begin() as session:
        mark_results_written(session=session, job_id=run.job_id, shard_no=run.shard_no)


def _cancelled(runtime: Runtime, run: ShardRun) -> dict[str, Any]:
    """The job was cancelled while this shard was being claimed: no inference, no results; the
    shard ends `cancelled`, counted with the rest of the job's cancelled documents."""
    try:
        with runtime.sessions.begin() as session:
            held = cancel_held(session=session, **run.fence)
    finally:
        runtime.drop(run.job_id, run.shard_no)
    SHARDS.labels(runtime.route, "cancelled").inc()
    logger.info("job cancelled before the shard's work began: shard cancelled (held=%s)", held)
    return {"claimed": True, "committed": False, "cancelled": held}


def _release(runtime: Runtime, run: ShardRun) -> None:
    SHARDS.labels(runtime.route, "released").inc()
    try:
        with runtime.sessions.begin() as session:
            release_shard(session=session, **run.fence)
    except OperationalError as e:  # the database is down too: the lease will run out instead
        logger.warning("could not release the shard (%s); its lease will expire", e)


def _done(runtime: Runtime, run: ShardRun) -> dict[str, Any]:
    results, marks = run.results, run.marks
    failed = sum(1 for r in results if r.error)
    runtime.docs_done += len(results)
    runtime.shards_done += 1
    ended = time.monotonic()
    # Where the shard's time went (bench/ceiling.py sums these across shards).
    logger.info(
        "shard done: docs=%d failed=%d secs=%.3f attempt=%d claim=%.3f read=%.3f "
        "classify=%.3f commit=%.3f write=%.3f",
        len(results),
        failed,
        ended - marks["started"],
        run.claimed.attempt,
        marks["claimed"] - marks["started"],
        marks["read"] - marks["claimed"],
        marks["classified"] - marks["read"],
        marks["committed"] - marks["classified"],
        ended - marks["committed"],
    )
    return {"claimed": True, "committed": True, "docs": len(results), "failed": failed}
