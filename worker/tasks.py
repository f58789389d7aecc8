"""Celery task bodies, kept thin: claim → read → classify → write → finish.

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
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError
from celery import Celery, Task
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from postroom.db.models import Job, Shard
from postroom.domain import DocResult, JobSpec, JobStatus
from postroom.errors import EngineDeadError
from postroom.jobs import (
    child_shard_nos,
    claim_shard,
    finish_shard,
    mark_published,
    mark_results_written,
    release_shard,
    split_shard,
)
from postroom.keys import input_shard_key, result_shard_key
from postroom.logs import bound
from postroom.metrics import SHARDS, observe_shard
from postroom.queue import TASK_CLASSIFY_SHARD, publish_shard
from postroom.results import result_line, upsert_results
from worker.classifier import ModelNotHosted
from worker.runtime import Runtime, get_runtime
from worker.spill import SpillUnavailable

logger = logging.getLogger(__name__)

TRANSIENT = (
    BotoCoreError,
    ClientError,
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
            try:
                return run_shard(runtime, uuid.UUID(job_id), shard_no, celery=self.app)
            except EngineDeadError:
                logger.critical("engine died; exiting so the supervisor restarts this worker")
                os._exit(70)
            except TRANSIENT as e:
                retries = self.request.retries or 0
                countdown = min(runtime.settings.retry_backoff_max_seconds, 2**retries)
                countdown = countdown * (0.5 + random.random())
                logger.warning("shard failed transiently (%s); retrying in %.1fs", e, countdown)
                raise self.retry(exc=e, countdown=countdown) from e


def run_shard(
    runtime: Runtime, job_id: uuid.UUID, shard_no: int, *, celery: Celery
) -> dict[str, Any]:
    """Admission first, claim second: a shard under suspicion (it was in flight when a worker
    died, or it is a part of a split) runs alone in this worker, and nothing else is even claimed
    meanwhile, so a crash while it runs is pinned on it and on no other shard."""
    with runtime.sessions() as session:
        peek = session.execute(
            select(Shard.attempt, Shard.releases, Job.shard_count)
            .join(Job, Job.id == Shard.job_id)
            .where(Shard.job_id == job_id, Shard.shard_no == shard_no)
        ).one_or_none()
    if peek is None:
        logger.warning("no such shard: the message is stale")
        return {"claimed": False}
    suspect = peek.attempt - peek.releases > 0 or shard_no >= peek.shard_count
    with runtime.admission(exclusive=suspect):
        return _run_admitted(runtime, job_id, shard_no, celery=celery)


def _run_admitted(
    runtime: Runtime, job_id: uuid.UUID, shard_no: int, *, celery: Celery
) -> dict[str, Any]:
    settings = runtime.settings
    started = time.monotonic()
    with runtime.sessions.begin() as session:
        claimed = claim_shard(
            session=session,
            job_id=job_id,
            shard_no=shard_no,
            worker=runtime.name,
            lease_seconds=settings.lease_seconds,
            route=runtime.route,
        )
        if claimed is None:
            logger.info("shard not claimable (done, running elsewhere or cancelled): no-op")
            return {"claimed": False}
        attempt, crashes = claimed
        job_row = session.execute(
            select(Job.spec, Job.status, Job.shard_count).where(Job.id == job_id)
        ).one()
        queue = session.execute(
            select(Shard.queue).where(Shard.job_id == job_id, Shard.shard_no == shard_no)
        ).scalar_one()
    spec = JobSpec.model_validate(job_row.spec)
    runtime.hold(job_id, shard_no, attempt)
    t_claimed = time.monotonic()
    try:
        docs = list(runtime.storage.iter_jsonl(input_shard_key(job_id, shard_no)))
        t_read = time.monotonic()
        # Attempts are counted at claim time, so a worker that crashed on this shard counted too.
        limit = (
            settings.max_attempts if shard_no < job_row.shard_count else settings.split_max_attempts
        )
        if crashes >= limit and len(docs) > 1:
            return split_poison_shard(
                runtime,
                job_id,
                shard_no,
                attempt,
                crashes,
                docs,
                queue,
                job_row.shard_count,
                celery,
            )
        if crashes >= limit:
            reason = (
                f"poison: this document crashed or hung the worker {crashes} time(s); it was "
                "isolated from its shard and skipped"
            )
            results = [DocResult(id=str(d["id"]), error=reason) for d in docs]
        elif job_row.status == JobStatus.cancelled:
            results = [DocResult(id=str(d["id"]), error="cancelled") for d in docs]
        else:
            assert runtime.classifier is not None
            marker = settings.fault_poison_marker
            if marker and any(marker in str(d["text"]) for d in docs):
                # Fault injection (tests only): this document "crashes the engine".
                raise EngineDeadError("fault injection: poison document")
            results = runtime.classifier.classify(
                job_id=job_id, spec=spec, shard=f"{job_id}/{shard_no}", docs=docs
            )
            results = check_labels(spec, results)
        t_classified = time.monotonic()
        lines = [
            result_line(r, route=runtime.route, model=spec.model, revision=spec.revision)
            for r in results
        ]
        failed = sum(1 for r in results if r.error)
        with runtime.sessions.begin() as session:
            # Rows first, the fenced finish last: finish_shard locks the job row to complete it,
            # and that lock is then held only for the moment before the commit, so shards of one
            # job finishing together do not queue behind each other's upserts.
            upsert_results(
                session=session,
                job_id=job_id,
                shard_no=shard_no,
                attempt=attempt,
                route=runtime.route,
                model=spec.model,
                revision=spec.revision,
                results=[(int(d["line"]), r) for d, r in zip(docs, results, strict=True)],
            )
            won = finish_shard(
                session=session,
                job_id=job_id,
                shard_no=shard_no,
                attempt=attempt,
                succeeded=len(results) - failed,
                failed=failed,
                route=runtime.route,
                tokens_in=sum(r.tokens_in for r in results),
                tokens_out=sum(r.tokens_out for r in results),
            )
            if not won:
                # Fenced out: roll back the rows written above with everything else.
                session.rollback()
                SHARDS.labels(runtime.route, "lease_lost").inc()
                logger.warning("lease lost before commit (attempt %d): results discarded", attempt)
                return {"claimed": True, "committed": False}
        t_committed = seconds_done = time.monotonic()
        seconds = seconds_done - started
        observe_shard(
            settings=settings,
            route=runtime.route,
            model=spec.model,
            results=results,
            seconds=seconds,
        )
        # Only the attempt that won the fenced commit gets here, so a worker that lost its lease
        # can never overwrite the object. A crash before this line leaves the object to the
        # reaper, which rebuilds it from the committed rows.
        runtime.storage.put_jsonl(result_shard_key(job_id, shard_no), lines)
        with runtime.sessions.begin() as session:
            mark_results_written(session=session, job_id=job_id, shard_no=shard_no)
    except TRANSIENT:
        SHARDS.labels(runtime.route, "released").inc()
        try:
            with runtime.sessions.begin() as session:
                release_shard(session=session, job_id=job_id, shard_no=shard_no, attempt=attempt)
        except OperationalError as e:  # the database is down too: the lease will run out instead
            logger.warning("could not release the shard (%s); its lease will expire", e)
        raise
    finally:
        runtime.drop(job_id, shard_no)
    runtime.docs_done += len(results)
    runtime.shards_done += 1
    ended = time.monotonic()
    # Where the shard's time went (bench/ceiling.py sums these across shards).
    logger.info(
        "shard done: docs=%d failed=%d secs=%.3f attempt=%d claim=%.3f read=%.3f "
        "classify=%.3f commit=%.3f write=%.3f",
        len(results),
        failed,
        ended - started,
        attempt,
        t_claimed - started,
        t_read - t_claimed,
        t_classified - t_read,
        t_committed - t_classified,
        ended - t_committed,
    )
    return {"claimed": True, "committed": True, "docs": len(results), "failed": failed}


def split_poison_shard(
    runtime: Runtime,
    job_id: uuid.UUID,
    shard_no: int,
    attempt: int,
    crashes: int,
    docs: list[dict[str, Any]],
    queue: str,
    shard_count: int,
    celery: Celery,
) -> dict[str, Any]:
    """Replace a shard that keeps killing workers by up to `split_fanout` parts, to corner the
    poison. Parts run alone in their worker (see Runtime.exclusive), so a crash is theirs.

    Child inputs are written under deterministic keys before the fenced commit, so a crash in
    between leaves the parent to expire and split again into the same children.
    """
    fanout = runtime.settings.split_fanout
    count = min(fanout, len(docs))
    parts = [docs[i * len(docs) // count : (i + 1) * len(docs) // count] for i in range(count)]
    children = child_shard_nos(shard_no, shard_count=shard_count, fanout=fanout, parts=count)
    for child, part in zip(children, parts, strict=True):
        runtime.storage.put_jsonl(input_shard_key(job_id, child), part)
    with runtime.sessions.begin() as session:
        created = split_shard(
            session=session,
            job_id=job_id,
            shard_no=shard_no,
            attempt=attempt,
            children=children,
            child_sizes=[len(p) for p in parts],
            queue=queue,
        )
    if not created:
        return {"claimed": True, "committed": False}
    SHARDS.labels(runtime.route, "split").inc()
    published = []
    for child in created:
        publish_shard(celery, job_id=str(job_id), shard_no=child, queue=queue)
        published.append((job_id, child))
    with runtime.sessions.begin() as session:
        mark_published(session=session, shards=published)
    logger.warning(
        "shard crashed %d workers: split into %s to isolate the poison",
        crashes,
        created,
    )
    return {"claimed": True, "split": created}


OFF_LABEL = "the answer was not one of the job's labels; the document was not labelled"


def check_labels(spec: JobSpec, results: list[DocResult]) -> list[DocResult]:
    """The server-side re-check before anything is stored, whatever the engine or the managed
    API answered (documents are data, and decoding is constrained, but this does not trust
    that): a label outside the job's label set becomes a per-document error, never a label."""
    allowed = {label.name for label in spec.labels}
    return [
        r
        if (r.label is None or r.label in allowed)
        and (r.distribution is None or set(r.distribution) <= allowed)
        else r.model_copy(
            update={"label": None, "confidence": None, "distribution": None, "error": OFF_LABEL}
        )
        for r in results
    ]
