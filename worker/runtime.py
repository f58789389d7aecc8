"""A worker process's long-lived parts: DB, S3, loop thread, engines, heartbeats, leases."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import func
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from postroom.db.models import Worker
from postroom.db.session import make_engine, make_sessionmaker
from postroom.domain import Cascade
from postroom.settings import (
    DEFAULT_SMOLLM2_MODEL_DIR,
    DEFAULT_TINY_MODEL_DIR,
    SMOLLM2_SHA256,
    Settings,
)
from postroom.shards import extend_leases
from postroom.storage import Storage
from worker.classifier import Classifier, EngineClassifier, NullClassifier
from worker.engine import EngineAdapter
from worker.gguf_model import prepare_smollm2
from worker.loop import LoopThread
from worker.self_check import BrokenClassifier
from worker.spill import SpillClassifier
from worker.tiny_model import build_model

logger = logging.getLogger(__name__)


def prepare_models(settings: Settings, aliases: list[str]) -> None:
    """Make the aliases that need no download (`tiny`: generated; `smollm2`: converted from the
    installed wheel) on first start; idempotent and quick once made."""
    for alias in aliases:
        path = settings.model_spec(alias).path
        if path == DEFAULT_TINY_MODEL_DIR and not Path(path).exists():
            build_model(Path(path))
        elif path == DEFAULT_SMOLLM2_MODEL_DIR:
            prepare_smollm2(Path(path), expected_sha256=SMOLLM2_SHA256)


class Admission:
    """A writer-preferring readers-writer lock: normal shards share the engine, a suspect shard
    waits for them to drain and then runs alone; while a suspect waits, no new shard starts."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextlib.contextmanager
    def __call__(self, *, exclusive: bool) -> Iterator[None]:
        with self._cond:
            if exclusive:
                self._writers_waiting += 1
                self._cond.wait_for(lambda: not self._writer and self._readers == 0)
                self._writers_waiting -= 1
                self._writer = True
            else:
                self._cond.wait_for(lambda: not self._writer and not self._writers_waiting)
                self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                if exclusive:
                    self._writer = False
                else:
                    self._readers -= 1
                self._cond.notify_all()


class ClaimGate:
    """Around each claim and its `hold` (`with gate() as open_:`): once closed, claims nothing
    (`open_` is False), and `close` waits for the claims under way, so the leases then held are
    every shard this process will ever have claimed (it is about to exit: worker/self_check.py)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._open = 0
        self._closed = False

    @contextlib.contextmanager
    def __call__(self) -> Iterator[bool]:
        with self._cond:
            open_ = not self._closed
            if open_:
                self._open += 1
        if not open_:
            yield False
            return
        try:
            yield True
        finally:
            with self._cond:
                self._open -= 1
                self._cond.notify_all()

    def close(self, *, timeout: float = 30.0) -> bool:
        """Whether every claim under way finished within `timeout`."""
        with self._cond:
            self._closed = True
            return self._cond.wait_for(lambda: self._open == 0, timeout=timeout)


class Runtime:
    """Everything a task needs, built once per worker process (never at import)."""

    def __init__(
        self,
        settings: Settings,
        *,
        models: list[str],
        route: str = "gpu",
        concurrency: int | None = None,
    ) -> None:
        """`concurrency`: shards this process works at once (Celery's pool)."""
        self.settings = settings
        self.concurrency = concurrency
        self.models = models
        self.route = route
        self.name = f"{route}@{socket.gethostname()}:{os.getpid()}"
        self.sessions: sessionmaker[Session] = make_sessionmaker(make_engine(settings))
        self.storage = Storage(settings)
        self.loop = LoopThread()
        self.engines: dict[str, EngineAdapter] = {}
        self.classifier: Classifier | None = None
        self._frontier_spill: SpillClassifier | None = None
        self._frontier_lock = threading.Lock()
        self._leases: dict[tuple[uuid.UUID, int], int] = {}
        self._leases_lock = threading.Lock()
        self._recent_jobs: list[uuid.UUID] = []
        self.claiming = ClaimGate()
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self.docs_done = 0
        self.shards_done = 0
        self.admission = Admission()

    def start(self) -> None:
        hosted = self.route == "gpu" and not self.settings.worker_null_classifier
        self.beat()  # register first: the API accepts jobs for these aliases from now on
        prepare_models(self.settings, self.models if hosted else [])
        for alias in self.models if hosted else []:
            spec = self.settings.model_spec(alias)
            engine = EngineAdapter(
                alias=alias, spec=spec, path=self.settings.model_path(alias), settings=self.settings
            )
            self.loop.run(engine.start(), timeout=900)
            self.engines[alias] = engine
        if self.route == "spill":
            self.classifier = SpillClassifier(
                loop=self.loop, settings=self.settings, shards_at_once=self.concurrency
            )
        elif self.settings.worker_null_classifier:
            self.classifier = NullClassifier()
        else:
            self.classifier = EngineClassifier(
                loop=self.loop,
                engines=self.engines,
                doc_max_tokens=self.settings.doc_max_tokens,
                choice_max_tokens=self.settings.choice_max_tokens,
                embedding_temperature=self.settings.embedding_temperature,
                timeout=self.settings.engine_request_timeout_seconds,
                submit_chunk=self.settings.engine_submit_chunk,
                embedding_center_min_docs=self.settings.embedding_center_min_docs,
                embedding_label_weight=self.settings.embedding_label_weight,
            )
        if self.settings.fault_broken_worker:
            self.classifier = BrokenClassifier()
        self._heartbeat = threading.Thread(target=self._beat_forever, name="heartbeat", daemon=True)
        self._heartbeat.start()
        self.beat()
        logger.info("worker %s ready: models %s", self.name, ",".join(self.models))

    def frontier(self, cascade: Cascade) -> Classifier | None:
        """The classifier of a job's cascade route: the managed API (made on first use, one
        per process so its concurrency and breaker are shared), or this worker's engines when
        they host the alias; None when this worker cannot reach it."""
        if cascade.route == "spill":
            with self._frontier_lock:
                if self._frontier_spill is None:
                    self._frontier_spill = SpillClassifier(
                        loop=self.loop, settings=self.settings, settle=True
                    )
                return self._frontier_spill
        if cascade.model in self.engines:
            return self.classifier
        return None

    def stop(self) -> None:
        self._stop.set()
        for engine in self.engines.values():
            engine.shutdown()
        self.loop.stop()

    # -- leases of shards being worked, pushed out by the heartbeat
    def hold(self, job_id: uuid.UUID, shard_no: int, attempt: int) -> None:
        with self._leases_lock:
            self._leases[(job_id, shard_no)] = attempt
            # The last job worked stays preferred while this worker is between shards.
            self._recent_jobs = [job_id]

    def drop(self, job_id: uuid.UUID, shard_no: int) -> None:
        with self._leases_lock:
            self._leases.pop((job_id, shard_no), None)

    def jobs_in_hand(self) -> set[uuid.UUID]:
        """Jobs this worker runs a shard of: the claim policy prefers them on a tie (prefix
        cache)."""
        with self._leases_lock:
            return {job_id for job_id, _ in self._leases} | set(self._recent_jobs)

    def leases(self) -> list[tuple[uuid.UUID, int, int]]:
        """(job, shard, attempt) of every shard this worker holds."""
        with self._leases_lock:
            return [(job, shard, attempt) for (job, shard), attempt in self._leases.items()]

    def shards_in_flight(self) -> int:
        with self._leases_lock:
            return len(self._leases)

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = {
            "shards_in_flight": self.shards_in_flight(),
            "shards_done": self.shards_done,
            "docs_done": self.docs_done,
            "engines": {alias: engine.stats() for alias, engine in self.engines.items()},
        }
        if isinstance(self.classifier, SpillClassifier):
            stats["spill"] = self.classifier.health()
        return stats

    def beat(self) -> None:
        """Upsert this worker's row (models, stats) and extend the leases it holds."""
        leases = self.leases()
        stats = self.stats()
        with self.sessions.begin() as session:
            stmt = insert(Worker).values(
                name=self.name,
                route=self.route,
                models=self.models,
                stats=stats,
                docs_done=self.docs_done,
            )
            session.execute(
                stmt.on_conflict_do_update(
                    index_elements=[Worker.name],
                    set_={
                        "heartbeat_at": func.now(),
                        "stats": stmt.excluded.stats,
                        "models": stmt.excluded.models,
                        "docs_done": stmt.excluded.docs_done,
                    },
                )
            )
            if leases:
                extend_leases(
                    session=session, leases=leases, lease_seconds=self.settings.lease_seconds
                )

    def _beat_forever(self) -> None:
        while not self._stop.wait(self.settings.worker_heartbeat_seconds):
            try:
                self.beat()
            except SQLAlchemyError as e:
                logger.warning("heartbeat failed: %s", e)


_runtime: Runtime | None = None


def set_runtime(runtime: Runtime | None) -> None:
    global _runtime
    _runtime = runtime


def get_runtime() -> Runtime:
    if _runtime is None:
        raise RuntimeError(
            "the worker runtime is not started (start workers with `postroom worker`)"
        )
    return _runtime
