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

from postroom.db.models import Job
from postroom.domain import DocResult, JobSpec, JobStatus
from postroom.errors import EngineDeadError
from postroom.jobs import claim_shard, finish_shard, release_shard
from postroom.keys import input_shard_key, result_shard_key
from postroom.logs import bound
from postroom.queue import TASK_CLASSIFY_SHARD
from postroom.results import result_line, upsert_results
from worker.classifier import ModelNotHosted
from worker.runtime import Runtime, get_runtime

logger = logging.getLogger(__name__)

TRANSIENT = (BotoCoreError, ClientError, OperationalError, ModelNotHosted, TimeoutError)


def register_tasks(app: Celery) -> None:
    @app.task(name=TASK_CLASSIFY_SHARD, bind=True, acks_late=True, max_retries=None)
    def classify_shard(self: Task[Any, Any], job_id: str, shard_no: int) -> dict[str, Any]:
        """Classify one shard; see the module docstring for why a second run is harmless."""
        runtime = get_runtime()
        with bound(job_id=job_id, shard_no=shard_no, task_id=self.request.id, route=runtime.route):
            try:
                return run_shard(runtime, uuid.UUID(job_id), shard_no)
            except EngineDeadError:
                logger.critical("engine died; exiting so the supervisor restarts this worker")
                os._exit(70)
            except TRANSIENT as e:
                retries = self.request.retries or 0
                countdown = min(runtime.settings.retry_backoff_max_seconds, 2**retries)
                countdown = countdown * (0.5 + random.random())
                logger.warning("shard failed transiently (%s); retrying in %.1fs", e, countdown)
                raise self.retry(exc=e, countdown=countdown) from e


def run_shard(runtime: Runtime, job_id: uuid.UUID, shard_no: int) -> dict[str, Any]:
    settings = runtime.settings
    started = time.monotonic()
    with runtime.sessions.begin() as session:
        attempt = claim_shard(
            session=session,
            job_id=job_id,
            shard_no=shard_no,
            worker=runtime.name,
            lease_seconds=settings.lease_seconds,
        )
        if attempt is None:
            logger.info("shard not claimable (done, running elsewhere or cancelled): no-op")
            return {"claimed": False}
        job_row = session.execute(select(Job.spec, Job.status).where(Job.id == job_id)).one()
    spec = JobSpec.model_validate(job_row.spec)
    runtime.hold(job_id, shard_no, attempt)
    try:
        docs = list(runtime.storage.iter_jsonl(input_shard_key(job_id, shard_no)))
        if attempt > settings.max_attempts:
            reason = f"max_attempts: the shard failed {attempt - 1} times"
            results = [DocResult(id=str(d["id"]), error=reason) for d in docs]
        elif job_row.status == JobStatus.cancelled:
            results = [DocResult(id=str(d["id"]), error="cancelled") for d in docs]
        else:
            assert runtime.classifier is not None
            results = runtime.classifier.classify(
                job_id=job_id, spec=spec, shard=f"{job_id}/{shard_no}", docs=docs
            )
        lines = [
            result_line(r, route=runtime.route, model=spec.model, revision=spec.revision)
            for r in results
        ]
        runtime.storage.put_jsonl(result_shard_key(job_id, shard_no), lines)
        failed = sum(1 for r in results if r.error)
        with runtime.sessions.begin() as session:
            won = finish_shard(
                session=session,
                job_id=job_id,
                shard_no=shard_no,
                attempt=attempt,
                succeeded=len(results) - failed,
                failed=failed,
                route=runtime.route,
            )
            if not won:
                session.rollback()
                logger.warning("lease lost before commit (attempt %d): results discarded", attempt)
                return {"claimed": True, "committed": False}
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
    except TRANSIENT:
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
    logger.info(
        "shard done: docs=%d failed=%d secs=%.2f attempt=%d",
        len(results),
        failed,
        time.monotonic() - started,
        attempt,
    )
    return {"claimed": True, "committed": True, "docs": len(results), "failed": failed}
