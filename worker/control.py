"""`postroom beat`: Celery beat and a one-thread worker on the `control` queue."""

from __future__ import annotations

import logging
from typing import Any

import redis
from celery import Celery, signals
from sqlalchemy.orm import Session, sessionmaker

from postroom.db.session import make_engine, make_sessionmaker
from postroom.logs import configure_logging
from postroom.queue import QUEUE_CONTROL, TASK_REAP, make_celery
from postroom.settings import Settings
from postroom.storage import Storage
from worker.reaper import reap

logger = logging.getLogger(__name__)


class Control:
    def __init__(self, settings: Settings, celery: Celery) -> None:
        self.settings = settings
        self.celery = celery
        self.sessions: sessionmaker[Session] = make_sessionmaker(make_engine(settings))
        self.storage = Storage(settings)
        self.redis = redis.Redis.from_url(
            settings.broker_url, socket_timeout=10, socket_connect_timeout=10
        )


def build_control_app(settings: Settings) -> tuple[Celery, dict[str, Control]]:
    app = make_celery(settings)
    holder: dict[str, Control] = {}

    @app.task(name=TASK_REAP, ignore_result=True)
    def reap_task() -> dict[str, int]:
        """Expire dead leases and republish lost shards; safe to run twice (see worker.reaper)."""
        report = reap(
            sessions=holder["control"].sessions,
            celery=app,
            redis=holder["control"].redis,
            storage=holder["control"].storage,
            settings=settings,
        )
        return report.__dict__

    interval = settings.reaper_interval_seconds
    app.conf.beat_schedule = {
        "reap": {
            "task": TASK_REAP,
            "schedule": interval,
            "options": {"queue": QUEUE_CONTROL, "expires": interval * 2},
        },
    }
    app.conf.beat_scheduler = "celery.beat:Scheduler"  # in memory: Postgres is the state
    return app, holder


def run_beat(settings: Settings, *, loglevel: str = "INFO") -> None:
    app, holder = build_control_app(settings)

    @signals.setup_logging.connect(weak=False)
    def _setup_logging(**_: Any) -> None:
        configure_logging(loglevel)

    @signals.worker_init.connect(weak=False)
    def _start(**_: Any) -> None:
        holder["control"] = Control(settings, app)

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
