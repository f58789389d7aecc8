"""The batch poll, a task of `postroom beat`: look at every shard parked on a provider's batch
(postroom.spill_batches), collect the completed ones and give the others back when they expire,
fail or are cancelled.

Safe to run twice: collecting commits the results through the shard's fenced finish (upserts keyed
by (job_id, doc_id); the second finish finds the shard done and rolls back), and giving a shard
back is the fenced release of its attempt, so only one of two polls does it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import openai
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from postroom.db.models import Shard, SpillBatch
from postroom.jobs import work_order
from postroom.keys import input_shard_key, result_shard_key
from postroom.metrics import observe_shard
from postroom.queue import Celery, publish_and_record
from postroom.results import result_line, upsert_results
from postroom.settings import Settings
from postroom.shards import finish_shard, mark_results_written, release_shard
from postroom.spill_batches import (
    PARK_GRACE,
    REMOTE_DONE,
    REMOTE_GAVE_UP,
    ROUTE_BATCH,
    batch_client,
    open_batches,
    read_output,
    set_state,
)
from postroom.storage import Storage, StorageError

logger = logging.getLogger(__name__)


@dataclass
class PollReport:
    open: int = 0
    collected: int = 0
    returned: int = 0
    superseded: int = 0


def poll_batches(
    *,
    sessions: sessionmaker[Session],
    storage: Storage,
    settings: Settings,
    celery: Celery,
) -> PollReport:
    report = PollReport()
    with sessions() as session:
        rows = open_batches(session=session)
        session.expunge_all()
    if not rows:
        return report
    client = batch_client(settings)
    for row in rows:
        report.open += 1
        try:
            outcome = _poll_one(sessions, storage, settings, celery, client, row)
        except (openai.OpenAIError, StorageError, OperationalError) as e:
            logger.warning("batch %s: could not poll (%s); next tick", row.remote_batch_id, e)
            continue
        if outcome:
            setattr(report, outcome, getattr(report, outcome) + 1)
    return report


def _poll_one(
    sessions: sessionmaker[Session],
    storage: Storage,
    settings: Settings,
    celery: Celery,
    client: openai.OpenAI,
    row: SpillBatch,
) -> str | None:
    """Collect, give back, or leave the batch for the next tick (None)."""
    assert row.remote_batch_id is not None
    remote = client.batches.retrieve(row.remote_batch_id)
    if remote.status == REMOTE_DONE:
        return _collect(sessions, storage, settings, client, row, remote)
    if remote.status in REMOTE_GAVE_UP:
        return _give_back(sessions, celery, row, f"remote batch {remote.status}")
    if datetime.now(UTC) > row.expires_at + PARK_GRACE / 2:
        # The provider did not end it within its own window: stop waiting for it.
        _cancel(client, row.remote_batch_id)
        return _give_back(sessions, celery, row, "remote batch past its window")
    return None


def _lines(client: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if not file_id:
        return []
    text = client.files.content(file_id).text
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _collect(
    sessions: sessionmaker[Session],
    storage: Storage,
    settings: Settings,
    client: openai.OpenAI,
    row: SpillBatch,
    remote: Any,
) -> str:
    """The batch's answers become the shard's results: the same fenced commit as a worker's."""
    fence: dict[str, Any] = {"job_id": row.job_id, "shard_no": row.shard_no, "attempt": row.attempt}
    docs = list(storage.iter_jsonl(input_shard_key(row.job_id, row.shard_no)))
    with sessions() as session:
        order = work_order(session=session, job_id=row.job_id)
    spec = order.spec
    results = read_output(
        docs,
        [label.name for label in spec.labels],
        _lines(client, remote.output_file_id),
        _lines(client, remote.error_file_id),
    )
    failed = sum(1 for r in results if r.error)
    with sessions.begin() as session:
        upsert_results(
            session=session,
            **fence,
            route=ROUTE_BATCH,
            model=spec.model,
            revision=spec.revision,
            results=[(int(d["line"]), r) for d, r in zip(docs, results, strict=True)],
            job_created_at=order.created_at,
            part=order.part,
        )
        won = finish_shard(
            session=session,
            **fence,
            succeeded=len(results) - failed,
            failed=failed,
            route=ROUTE_BATCH,
            tokens_in=sum(r.tokens_in for r in results),
            tokens_out=sum(r.tokens_out for r in results),
        )
        if won:
            set_state(session=session, **fence, state="collected")
        else:
            session.rollback()
    if not won:
        with sessions.begin() as session:
            set_state(session=session, **fence, state="superseded", note="the shard moved on")
        logger.warning("batch %s: the shard moved on; its results are ignored", remote.id)
        return "superseded"
    observe_shard(
        settings=settings, route=ROUTE_BATCH, model=spec.model, results=results, seconds=0.0
    )
    lines = [
        result_line(r, route=ROUTE_BATCH, model=spec.model, revision=spec.revision) for r in results
    ]
    # After the commit, as a worker does: a poll that dies here leaves the object to the reaper.
    storage.put_jsonl(result_shard_key(row.job_id, row.shard_no), lines)
    with sessions.begin() as session:
        mark_results_written(session=session, job_id=row.job_id, shard_no=row.shard_no)
    logger.info(
        "batch %s collected: job %s shard %d, %d docs, %d failed",
        remote.id,
        row.job_id,
        row.shard_no,
        len(results),
        failed,
    )
    return "collected"


def _give_back(sessions: sessionmaker[Session], celery: Celery, row: SpillBatch, why: str) -> str:
    """The shard goes back to its queue for the router; its next attempt runs without a batch."""
    fence: dict[str, Any] = {"job_id": row.job_id, "shard_no": row.shard_no, "attempt": row.attempt}
    with sessions.begin() as session:
        released = release_shard(session=session, **fence)
        state = "returned" if released else "superseded"
        set_state(session=session, **fence, state=state, note=why)
        queue = session.get_one(Shard, (row.job_id, row.shard_no)).queue
    if not released:
        return "superseded"
    publish_and_record(celery, sessions, [(row.job_id, row.shard_no, queue)])
    logger.warning(
        "batch %s: %s; job %s shard %d goes back to %s",
        row.remote_batch_id,
        why,
        row.job_id,
        row.shard_no,
        queue,
    )
    return "returned"


def _cancel(client: openai.OpenAI, batch_id: str) -> None:
    try:
        client.batches.cancel(batch_id)
    except openai.OpenAIError as e:
        logger.warning("could not cancel batch %s (%s)", batch_id, e)
