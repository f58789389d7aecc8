"""The Celery app, its configuration, queue and task names, and publishing (ringing a shard's
doorbell). The only module that imports Celery: the worker and the beat take `Celery`, `Task`,
`signals` and `BrokerError` from here. No task bodies live here.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from typing import Any

from celery import Celery, Task, signals
from kombu.exceptions import OperationalError as BrokerError
from sqlalchemy.orm import Session, sessionmaker

from postroom.backlog import unpublished_shards
from postroom.domain import QUEUE_SPILL
from postroom.settings import Settings
from postroom.shards import mark_published

__all__ = [
    "QUEUE_SPILL",
    "BrokerError",
    "Celery",
    "Task",
    "signals",
]

logger = logging.getLogger(__name__)

TASK_CLASSIFY_SHARD = "postroom.classify_shard"
TASK_REAP = "postroom.reap"
TASK_ROUTE = "postroom.route"
TASK_INBOX = "postroom.inbox"
TASK_PURGE = "postroom.purge"
TASK_WEBHOOKS = "postroom.webhooks"
TASK_SPILL_BATCHES = "postroom.spill_batches"
QUEUE_CONTROL = "control"
GPU_QUEUE_PREFIX = "gpu"


def gpu_queue(model_alias: str) -> str:
    """Each model alias has its own queue, so a job reaches only workers that host its model."""
    return f"{GPU_QUEUE_PREFIX}.{model_alias}"


def make_celery(settings: Settings) -> Celery:
    app = Celery("postroom", broker=settings.broker_url, set_as_current=False)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_default_queue=gpu_queue(settings.model),
        task_serializer="json",
        accept_content=["json"],
        task_send_sent_event=False,  # its plain name would hide the job/shard one in Flower
        worker_send_task_events=True,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=10,
        broker_transport_options={
            # A message not acked within this many seconds is delivered again; the shard claim
            # in Postgres turns the duplicate into a no-op.
            "visibility_timeout": settings.broker_visibility_timeout,
            "socket_timeout": 10,
            "socket_connect_timeout": 10,
            **(
                {"global_keyprefix": settings.broker_key_prefix}
                if settings.broker_key_prefix
                else {}
            ),
        },
        # Publishing must never hang an API request: a few quick retries, then the shard stays
        # queued in Postgres and is republished later.
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0.1, "interval_step": 0.5},
    )
    return app


def queue_depth(client: Any, queue: str, *, prefix: str = "") -> int:
    """Messages waiting in a Redis-backed Celery queue (kombu keeps one list per priority step)."""
    keys = [prefix + queue, *(f"{prefix}{queue}\x06\x16{p}" for p in (3, 6, 9))]
    return sum(int(client.llen(key)) for key in keys)


def trim_queue(client: Any, queue: str, count: int, *, prefix: str = "") -> int:
    """Drop up to `count` doorbells from a Redis-backed Celery queue (the newest first), when it
    holds more than there are shards to claim; returns how many went. Any doorbell of a queue
    claims by policy, so which ones go does not matter; a suspect's, if dropped, is rung again
    by the reaper (postroom.backlog.doorbells_owed)."""
    if count <= 0:
        return 0
    popped = client.lpop(prefix + queue, count)
    return len(popped or [])


def publish_shard(app: Celery, *, job_id: str, shard_no: int, queue: str) -> None:
    """Ring the doorbell for one shard. The message carries ids only; documents live in S3."""
    app.send_task(
        TASK_CLASSIFY_SHARD,
        args=(job_id, shard_no),
        queue=queue,
        shadow=f"{TASK_CLASSIFY_SHARD}[{job_id}/{shard_no:06d}]",
    )


def publish_shards(
    app: Celery, shards: Sequence[tuple[uuid.UUID, int, str]]
) -> list[tuple[uuid.UUID, int]]:
    """Ring the doorbell for each (job_id, shard_no, queue) in order; returns those rung.

    Stops at the first failure: Postgres is the record, and a shard not rung keeps
    `enqueued_at` NULL, so the reaper publishes it later. A broker outage delays work, never
    loses it.
    """
    published: list[tuple[uuid.UUID, int]] = []
    try:
        for job_id, shard_no, queue in shards:
            publish_shard(app, job_id=str(job_id), shard_no=shard_no, queue=queue)
            published.append((job_id, shard_no))
    except Exception as e:  # kombu raises many types here; the shards stay queued in Postgres
        logger.warning(
            "publishing stopped after %d of %d shards: %s", len(published), len(shards), e
        )
    return published


def publish_job(*, session: Session, celery: Celery, job_id: uuid.UUID) -> int:
    """Publish every queued, never-published shard of a job, in the caller's transaction.
    Call after the job is committed (a worker must find the shard it is told about)."""
    waiting = unpublished_shards(session=session, job_id=job_id)
    published = publish_shards(celery, [(job_id, no, queue) for no, queue in waiting])
    mark_published(session=session, shards=published)
    return len(published)


def publish_and_record(
    app: Celery, sessions: sessionmaker[Session], shards: Sequence[tuple[uuid.UUID, int, str]]
) -> int:
    """publish_shards, then record what was rung in a transaction of its own."""
    published = publish_shards(app, shards)
    if published:
        with sessions.begin() as session:
            mark_published(session=session, shards=published)
    return len(published)
