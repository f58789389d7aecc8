"""Shards that fail for good: an attempt that raised is handed on at once (counted like a crash,
unless the worker itself is broken: worker/self_check.py), and a shard that keeps failing is
split to corner the one document that does it (postroom.policy runs the parts alone, so a crash
is theirs)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import OperationalError

from postroom.keys import input_shard_key
from postroom.metrics import SHARDS
from postroom.queue import Celery, publish_and_record
from postroom.shard_numbers import child_shard_nos
from postroom.shards import fail_attempt, split_shard
from postroom.storage import StorageError
from worker.runtime import Runtime
from worker.self_check import WorkerBroken, give_back_all, self_check

if TYPE_CHECKING:
    from worker.tasks import ShardRun

logger = logging.getLogger(__name__)


def fail_shard(runtime: Runtime, run: ShardRun, error: Exception, celery: Celery) -> None:
    """An attempt that raised something no retry will fix: hand the shard on now rather than at
    its lease's end. The attempt counts like a crash, so a document that always raises is
    isolated by the split like one that kills the engine, and its error says what it raised.

    Unless the worker cannot classify a neutral document either (worker/self_check.py): then it
    is the worker, not the shard; every shard it holds goes back uncounted and WorkerBroken
    makes the process exit to be restarted."""
    text = f"{type(error).__name__}: {error}"
    assert runtime.classifier is not None
    broken = self_check(runtime.classifier, run.spec)
    if broken is not None:
        given = give_back_all(runtime, celery)
        logger.critical(
            "this worker is broken: a shard raised %s, and so did a neutral document (%s: %s); "
            "gave back %d shard(s) uncounted, exiting to be restarted",
            text,
            type(broken).__name__,
            broken,
            given,
        )
        raise WorkerBroken(f"self-check failed: {type(broken).__name__}: {broken}") from error
    SHARDS.labels(runtime.route, "failed_attempt").inc()
    try:
        with runtime.sessions.begin() as session:
            failed = fail_attempt(session=session, **run.fence, error=text)
        if failed:
            publish_and_record(
                celery, runtime.sessions, [(run.job_id, run.shard_no, run.claimed.queue)]
            )
    except (OperationalError, StorageError) as e:  # the lease will run out instead
        logger.warning("could not hand the failed shard on (%s); its lease will expire", e)


def split_poison_shard(
    runtime: Runtime, run: ShardRun, docs: list[dict[str, Any]], celery: Celery
) -> dict[str, Any]:
    """Replace a shard that keeps killing workers by up to `split_fanout` parts, to corner the
    poison. Parts run alone in their worker (see Runtime.exclusive), so a crash is theirs.

    Child inputs are written under deterministic keys before the fenced commit, so a crash in
    between leaves the parent to expire and split again into the same children.
    """
    job_id, queue = run.job_id, run.claimed.queue
    fanout = runtime.settings.split_fanout
    count = min(fanout, len(docs))
    parts = [docs[i * len(docs) // count : (i + 1) * len(docs) // count] for i in range(count)]
    children = child_shard_nos(
        run.shard_no, shard_count=run.order.shard_count, fanout=fanout, parts=count
    )
    for child, part in zip(children, parts, strict=True):
        runtime.storage.put_jsonl(input_shard_key(job_id, child), part)
    with runtime.sessions.begin() as session:
        created = split_shard(
            session=session,
            job_id=job_id,
            shard_no=run.shard_no,
            attempt=run.claimed.attempt,
            children=children,
            child_sizes=[len(p) for p in parts],
            queue=queue,
        )
    if not created:
        return {"claimed": True, "committed": False}
    SHARDS.labels(runtime.route, "split").inc()
    publish_and_record(celery, runtime.sessions, [(job_id, child, queue) for child in created])
    logger.warning(
        "shard crashed %d workers: split into %s to isolate the poison",
        run.claimed.crashes,
        created,
    )
    return {"claimed": True, "split": created}
