"""The Celery app, its configuration, queue names and task names. No task bodies live here."""

from __future__ import annotations

from typing import Any

from celery import Celery

from postroom.settings import Settings

TASK_CLASSIFY_SHARD = "postroom.classify_shard"
TASK_REAP = "postroom.reap"
TASK_ROUTE = "postroom.route"
TASK_INBOX = "postroom.inbox"
QUEUE_SPILL = "spill"
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


def publish_shard(app: Celery, *, job_id: str, shard_no: int, queue: str) -> None:
    """Ring the doorbell for one shard. The message carries ids only; documents live in S3."""
    app.send_task(
        TASK_CLASSIFY_SHARD,
        args=(job_id, shard_no),
        queue=queue,
        shadow=f"{TASK_CLASSIFY_SHARD}[{job_id}/{shard_no:06d}]",
    )
