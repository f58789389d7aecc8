"""`postroom worker`: a Celery worker (threads pool) around one Runtime per process."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from celery import Celery, signals

from postroom.logs import configure_logging
from postroom.queue import gpu_queue, make_celery
from postroom.settings import Settings
from worker.runtime import Runtime, get_runtime, set_runtime
from worker.tasks import register_tasks

logger = logging.getLogger(__name__)


def build_app(settings: Settings) -> Celery:
    app = make_celery(settings)
    register_tasks(app)
    return app


def run_worker(
    settings: Settings,
    *,
    models: list[str],
    queues: list[str] | None,
    concurrency: int,
    loglevel: str = "INFO",
) -> None:
    """Start a GPU worker serving `models`; blocks until the worker shuts down.

    The threads pool keeps `concurrency` shards in flight over one shared async engine per alias;
    prefork would load one engine per child and cannot host the engine's own child process.
    """
    app = build_app(settings)
    queue_names = queues or [gpu_queue(alias) for alias in models]

    @signals.setup_logging.connect(weak=False)
    def _setup_logging(**_: Any) -> None:
        configure_logging(loglevel)

    @signals.worker_init.connect(weak=False)
    def _start_runtime(**_: Any) -> None:
        runtime = Runtime(settings, models=models)
        set_runtime(runtime)
        runtime.start()

    @signals.worker_shutdown.connect(weak=False)
    def _stop_runtime(**_: Any) -> None:
        with contextlib.suppress(RuntimeError):
            get_runtime().stop()

    app.worker_main(
        [
            "worker",
            "--pool=threads",
            f"--concurrency={concurrency}",
            f"--queues={','.join(queue_names)}",
            f"--loglevel={loglevel}",
            "--without-gossip",
            "--without-mingle",
            "--task-events",
        ]
    )
