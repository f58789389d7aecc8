"""`postroom beat`: Celery beat and a one-thread worker on the `control` queue, running the reaper,
the router, the purge (deletions, retention), the patient-spill batch poll and the drop folder's
tick (their task names are fixed in postroom.queue)."""

from __future__ import annotations

import logging
from typing import Any

import redis
from sqlalchemy.orm import Session, sessionmaker

from control.inbox import InboxCursor, InboxDeps, run_tick
from control.purge import purge_tick
from control.reaper import reap
from control.router import route_tick
from control.spill_batches import poll_batches
from control.webhooks import make_http, send_due
from postroom.db.session import make_engine, make_sessionmaker
from postroom.logs import configure_logging
from postroom.metrics import serve_metrics
from postroom.queue import (
    QUEUE_CONTROL,
    TASK_INBOX,
    TASK_PURGE,
    TASK_REAP,
    TASK_ROUTE,
    TASK_SPILL_BATCHES,
    TASK_WEBHOOKS,
    Celery,
    make_celery,
    signals,
)
from postroom.settings import Settings
from postroom.storage import Storage

logger = logging.getLogger(__name__)


class Control:
    """What the beat's tasks share, built once the worker process starts (not at import)."""

    def __init__(self, settings: Settings, celery: Celery) -> None:
        self.settings = settings
        self.celery = celery
        self.sessions: sessionmaker[Session] = make_sessionmaker(make_engine(settings))
        self.storage = Storage(settings)
        self.http = make_http(settings)
        self.redis = redis.Redis.from_url(
            settings.broker_url, socket_timeout=10, socket_connect_timeout=10
        )


def build_control_app(settings: Settings) -> tuple[Celery, dict[str, Control]]:
    app = make_celery(settings)
    holder: dict[str, Control] = {}

    @app.task(name=TASK_REAP, ignore_result=True)
    def reap_task() -> dict[str, int]:
        """Expire dead leases and republish lost shards; safe to run twice (see control.reaper)."""
        report = reap(
            sessions=holder["control"].sessions,
            celery=app,
            redis=holder["control"].redis,
            storage=holder["control"].storage,
            settings=settings,
        )
        return report.__dict__

    @app.task(name=TASK_ROUTE, ignore_result=True)
    def route_task() -> int:
        """Send shards to spill where deadlines or dead GPUs need it (see control.router)."""
        return len(route_tick(sessions=holder["control"].sessions, celery=app, settings=settings))

    interval = settings.reaper_interval_seconds
    every = settings.router_interval_seconds
    app.conf.beat_schedule = {
        "reap": {
            "task": TASK_REAP,
            "schedule": interval,
            "options": {"queue": QUEUE_CONTROL, "expires": interval * 2},
        },
        "route": {
            "task": TASK_ROUTE,
            "schedule": every,
            "options": {"queue": QUEUE_CONTROL, "expires": every * 2},
        },
    }

    @app.task(name=TASK_PURGE, ignore_result=True)
    def purge_task() -> dict[str, int]:
        """Finish deletions and purge jobs past retention; safe twice (see control.purge)."""
        control = holder["control"]
        return purge_tick(
            sessions=control.sessions, storage=control.storage, settings=settings
        ).__dict__

    purge_every = settings.purge_interval_seconds
    app.conf.beat_schedule["purge"] = {
        "task": TASK_PURGE,
        "schedule": purge_every,
        "options": {"queue": QUEUE_CONTROL, "expires": purge_every * 2},
    }

    @app.task(name=TASK_WEBHOOKS, ignore_result=True)
    def webhooks_task() -> dict[str, int]:
        """Send due webhook deliveries; at least once (see control.webhooks)."""
        control = holder["control"]
        return send_due(sessions=control.sessions, settings=settings, http=control.http).__dict__

    hook_every = settings.webhook_interval_seconds
    app.conf.beat_schedule["webhooks"] = {
        "task": TASK_WEBHOOKS,
        "schedule": hook_every,
        "options": {"queue": QUEUE_CONTROL, "expires": hook_every * 2},
    }
    inbox_cursor = InboxCursor()

    @app.task(name=TASK_INBOX, ignore_result=True)
    def inbox_task() -> dict[str, Any]:
        """S3 drop folder: list, ingest, publish, finalize; safe twice (see control.inbox)."""
        control = holder["control"]
        deps = InboxDeps(settings, control.sessions, control.storage, app)
        return run_tick(deps, inbox_cursor).__dict__

    @app.task(name=TASK_SPILL_BATCHES, ignore_result=True)
    def spill_batches_task() -> dict[str, int]:
        """Collect or give back shards parked on a provider's batch; safe twice (see
        control.spill_batches)."""
        control = holder["control"]
        return poll_batches(
            sessions=control.sessions, storage=control.storage, settings=settings, celery=app
        ).__dict__

    batch_every = settings.spill_batch_poll_seconds
    app.conf.beat_schedule["spill_batches"] = {
        "task": TASK_SPILL_BATCHES,
        "schedule": batch_every,
        "options": {"queue": QUEUE_CONTROL, "expires": batch_every * 2},
    }

    if settings.inbox_enabled:
        app.conf.beat_schedule["inbox"] = {
            "task": TASK_INBOX,
            "schedule": settings.inbox_interval_seconds,
            "options": {"queue": QUEUE_CONTROL, "expires": settings.inbox_interval_seconds * 2},
        }
    app.conf.beat_scheduler = "celery.beat:Scheduler"  # in memory: Postgres is the state
    return app, holder


def run_beat(settings: Settings, *, loglevel: str = "INFO") -> None:
    # Celery sends worker_init (the metrics server) before its setup_logging signal.
    configure_logging(loglevel)
    app, holder = build_control_app(settings)

    @signals.setup_logging.connect(weak=False)
    def _setup_logging(**_: Any) -> None:
        configure_logging(loglevel)

    @signals.worker_init.connect(weak=False)
    def _start(**_: Any) -> None:
        holder["control"] = Control(settings, app)
        serve_metrics(port=settings.beat_metrics_port, bind=settings.metrics_bind)

    app.worker_main(
        [
            "worker",
            "--beat",
            "--pool=solo",
            f"--queues={QUEUE_CONTROL}",
            f"--loglevel={loglevel}",
            "--without-gossip",
            "--without-mingle",
            "--hostname=control@%h",
        ]
    )
