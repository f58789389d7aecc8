"""`postroom worker`: a Celery worker (threads pool) around one Runtime per process."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from postroom.db.session import make_engine, make_sessionmaker
from postroom.gpus import check_fits, visible_gpus
from postroom.logs import configure_logging
from postroom.metrics import WorkerCollector, serve_metrics
from postroom.pins import check_pins
from postroom.queue import QUEUE_SPILL, Celery, gpu_queue, make_celery, signals
from postroom.settings import Settings
from worker.engine import detect_device
from worker.runtime import Runtime, get_runtime, prepare_models, set_runtime
from worker.spill import check_client
from worker.tasks import register_tasks

logger = logging.getLogger(__name__)


def metrics_snapshot(runtime: Runtime) -> dict[str, Any]:
    """What WorkerCollector exports, read at scrape time from the runtime's plain counters."""
    engines = {
        alias: {
            "inflight": engine.inflight,
            "max_inflight": engine.max_inflight,
            "max_num_seqs": engine.max_num_seqs,
            "requests": engine.requests_total,
            "prompt_tokens": engine.prompt_tokens_total,
            "cached_tokens": engine.cached_tokens_total,
        }
        for alias, engine in list(runtime.engines.items())
    }
    return {
        "name": runtime.name,
        "route": runtime.route,
        "models": runtime.models,
        "shards_in_flight": runtime.shards_in_flight(),
        "engines": engines,
    }


def build_app(settings: Settings) -> Celery:
    app = make_celery(settings)
    register_tasks(app)
    return app


def verify_pins(settings: Settings, models: list[str]) -> dict[str, str]:
    """The pinned aliases' digests, checked against the files here (raises PinMismatch)."""
    engine = make_engine(settings)
    try:
        with make_sessionmaker(engine)() as session:
            return check_pins(session=session, settings=settings, aliases=models)
    finally:
        engine.dispose()


def run_worker(
    settings: Settings,
    *,
    models: list[str],
    queues: list[str] | None,
    concurrency: int,
    route: str = "gpu",
    loglevel: str = "INFO",
) -> None:
    """Start a GPU worker serving `models`; blocks until the worker shuts down.

    The threads pool keeps `concurrency` shards in flight over one shared async engine per alias;
    prefork would load one engine per child and cannot host the engine's own child process.
    """
    if route == "gpu" and not settings.worker_null_classifier:
        # An alias that needs more GPUs than this process sees is refused before Celery starts
        # (vLLM's own error comes minutes later, from deep inside an engine process).
        check_fits(
            {alias: settings.model_spec(alias) for alias in models},
            visible=len(visible_gpus(settings.visible_gpus)),
            device=detect_device(settings.engine_device),
        )
        # A pinned alias whose files changed is refused here too, naming both digests.
        prepare_models(settings, models)
        verify_pins(settings, models)
    if route == "spill":
        # A client that cannot be built would fail every shard while the heartbeat says "alive".
        check_client(settings)
    # Celery sends worker_init (engine start, metrics server) before its setup_logging signal.
    configure_logging(loglevel)
    app = build_app(settings)
    default_queues = [QUEUE_SPILL] if route == "spill" else [gpu_queue(a) for a in models]
    queue_names = queues or default_queues

    @signals.setup_logging.connect(weak=False)
    def _setup_logging(**_: Any) -> None:
        configure_logging(loglevel)

    @signals.worker_init.connect(weak=False)
    def _start_runtime(**_: Any) -> None:
        runtime = Runtime(
            settings,
            models=models if route == "gpu" else [],
            route=route,
            concurrency=concurrency,
        )
        set_runtime(runtime)
        serve_metrics(
            port=settings.worker_metrics_port,
            bind=settings.metrics_bind,
            collectors=[WorkerCollector(lambda: metrics_snapshot(runtime))],
        )
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
