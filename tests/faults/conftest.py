"""The fault stack: private Redis and Postgres, moto behind a TCP proxy, the API, `postroom beat`
(reaper and router) and a supervised worker, all started with the documented commands; the spill
scenario adds a supervised `postroom worker --route spill` against the stand-in managed API."""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from postroom.db.migrate import migrate
from postroom.db.models import Shard
from postroom.db.session import make_engine, make_sessionmaker
from postroom.storage import Storage
from postroom_cli.client import Client
from postroom_cli.local import postroom_command, settings_env, stop
from postroom_cli.standin import StandinServer
from tests.faults.harness import PrivatePostgres, PrivateRedis, Supervised, TcpProxy
from tests.stack import new_key, spawn_api, stack_settings, wait_api, worker_ready
from tests.waiting import wait_until

POISON = "\u2620POISON\u2620"
RAISES = "\u26a0RAISES\u26a0"  # a document the classifier raises on (not a crash)
# A registry alias no GPU worker of the stack serves: its jobs can only go through the spill route.
SPILL_ONLY = "managed"


@dataclass(frozen=True)
class Size:
    docs: int
    kills: int
    s3_outage: float


SIZES = {"ci": Size(docs=1500, kills=2, s3_outage=8.0), "full": Size(10_000, 3, 30.0)}
# pytest's 300 s per test guards CI size; a full-size scenario (10,000 documents, the managed-API
# one paced by its Retry-After pauses) takes longer than that on a small CPU machine.
FULL_SIZE_TIMEOUT = 1800
HERE = Path(__file__).parent

# The fault stack's settings beyond tests/stack.py's, by what they are for.
# Small shards, few in flight: a kill or an outage always lands in the middle of a job.
SHARDS = {"shard_size": 50, "worker_concurrency": 4}
# A dead or paused worker's lease runs out in seconds, and the reaper republishes its shard soon.
LEASES = {"lease_seconds": 6, "reaper_interval_seconds": 1.0, "republish_grace_seconds": 3.0}
# A shard that crashes its worker twice (the poison document) is split 8 ways, parts again after
# one more crash, until the one document fails alone.
ATTEMPTS = {"max_attempts": 2, "split_max_attempts": 1, "split_fanout": 8}
# Short timeouts and retry backoff, so S3, Redis and Postgres outages are felt and outlived fast.
OUTAGES = {
    "s3_timeout_seconds": 5.0,
    "database_statement_timeout_ms": 10_000,
    "retry_backoff_max_seconds": 4,
}
# The managed-API scenario: short call deadlines and backoff, a breaker that soon tries again.
SPILL = {
    "spill_call_deadline_seconds": 2.0,
    "spill_backoff_max_seconds": 1.0,
    "spill_breaker_reset_seconds": 2.0,
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--fault-size") != "full":
        return
    for item in items:
        if item.path.is_relative_to(HERE):
            item.add_marker(pytest.mark.timeout(FULL_SIZE_TIMEOUT))


@pytest.fixture(scope="session")
def size(request: pytest.FixtureRequest) -> Size:
    return SIZES[request.config.getoption("--fault-size")]


class FaultStack:
    def __init__(
        self, root: Path, tiny_model_dir: Path, s3_endpoint: str, standin: StandinServer
    ) -> None:
        self.root = root
        self.redis = PrivateRedis(root / "redis")
        self.postgres = PrivatePostgres()
        self.proxy = TcpProxy(int(s3_endpoint.rsplit(":", 1)[1]))
        self.standin = standin
        self.settings = stack_settings(
            database_url=self.postgres.url,
            broker_url=self.redis.url,
            s3_endpoint=f"http://127.0.0.1:{self.proxy.port}",
            s3_bucket=f"faults-{uuid.uuid4().hex[:6]}",
            tiny_model_dir=tiny_model_dir,
            # The managed API is the stand-in; the spill worker runs only in its own scenario.
            standin_url=standin.url,
            aliases=[SPILL_ONLY],
            worker_models=["tiny"],
            fault_poison_marker=POISON,
            fault_raise_marker=RAISES,
            worker_metrics_port=0,
            **SHARDS,
            **LEASES,
            **ATTEMPTS,
            **OUTAGES,
            **SPILL,
        )
        self.env = settings_env(self.settings)
        self.procs: list[Any] = []

    def start(self) -> None:
        self.redis.start()
        self.postgres.start()
        migrate(self.settings.database_url)
        Storage(self.settings).ensure_bucket()
        self.storage = Storage(self.settings)
        self.engine = make_engine(self.settings)
        self.sessions: sessionmaker[Session] = make_sessionmaker(self.engine)
        api, self.api_url = spawn_api(env=self.env, log=self.root / "api.log")
        self.procs.append(api)
        beat = Supervised(postroom_command("beat"), env=self.env, log=self.root / "beat.log")
        self.procs.append(beat)
        self.worker = Supervised(
            postroom_command("worker"), env=self.env, log=self.root / "worker.log"
        )
        wait_api(api, self.api_url, log=self.root / "api.log")
        self.wait_worker_ready()
        self.client = Client(self.api_url, new_key(self.sessions, tenant="faults"))

    def wait_worker_ready(self, worker: Supervised | None = None) -> None:
        """Until the (restarted) process has registered: with its engines up, for a GPU worker."""
        watched = worker or self.worker
        wait_until(
            lambda: worker_ready(self.sessions, watched.proc.pid),
            timeout=240,
            what=f"fault worker {' '.join(watched.args)} ready",
        )

    def start_spill_worker(self) -> Supervised:
        """`postroom worker --route spill`, supervised like the GPU worker; stop() it after use."""
        spill = Supervised(
            postroom_command("worker", "--route", "spill"),
            env=self.env,
            log=self.root / "spill.log",
        )
        try:
            self.wait_worker_ready(spill)
        except TimeoutError:
            spill.stop()
            raise
        return spill

    def stop(self) -> None:
        self.worker.stop()
        for proc in reversed(self.procs):
            proc.stop() if isinstance(proc, Supervised) else stop(proc)
        self.engine.dispose()
        self.proxy.close()
        self.redis.stop()
        self.postgres.stop()

    # -- helpers for scenarios
    def submit(
        self,
        docs: int,
        *,
        poison_at: int | None = None,
        seed: int = 0,
        marks: Mapping[int, str] | None = None,
        options: Mapping[str, str] | None = None,
    ) -> tuple[uuid.UUID, set[str]]:
        """Upload a job of `docs` random documents; `marks` appends a marker to the documents at
        those line numbers (`poison_at` the poison marker), `options` are extra job fields."""
        marks = {**(marks or {}), **({poison_at: POISON} if poison_at is not None else {})}
        rng = random.Random(seed)
        words = ("invoice", "charge", "login", "crash", "package", "late", "refund", "server")
        lines = []
        for i in range(docs):
            text = " ".join(rng.choices(words, k=rng.randint(20, 120)))
            if i in marks:
                text += " " + marks[i]
            lines.append({"id": f"f{seed}-{i:06d}", "text": text})
        path = self.root / f"job-{seed}.jsonl"
        path.write_text("".join(json.dumps(line) + "\n" for line in lines))
        # GPU scenarios say spill "never": a worker restart slower than POSTROOM_GPU_DEAD_AFTER
        # (a loaded machine) would otherwise rightly route the job to the spill route, which only
        # the spill scenario runs a worker for.
        fields = {"labels": "billing,technical,shipping", "spill": "never", **(options or {})}
        job = self.client.upload(path, fields)
        return uuid.UUID(job["id"]), {line["id"] for line in lines}

    def finished_docs(self, job_id: uuid.UUID) -> int:
        with self.sessions() as session:
            return int(
                session.execute(
                    select(func.coalesce(func.sum(Shard.succeeded + Shard.failed), 0)).where(
                        Shard.job_id == job_id
                    )
                ).scalar_one()
            )

    def wait_progress(self, job_id: uuid.UUID, at_least: int, *, timeout: float = 240) -> None:
        wait_until(
            lambda: self.finished_docs(job_id) >= at_least,
            timeout=timeout,
            what=f"{at_least} documents of {job_id} finished",
        )

    def wait_completed(self, job_id: uuid.UUID, *, timeout: float = 600) -> dict[str, Any]:
        def done() -> dict[str, Any] | None:
            job = self.client.job(str(job_id))
            return job if job["status"] in ("completed", "failed", "cancelled") else None

        return wait_until(done, timeout=timeout, what=f"job {job_id} completed")


@pytest.fixture(scope="session")
def fault_stack(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_model_dir: Path,
    s3_endpoint: str,
    standin: StandinServer,
) -> Iterator[FaultStack]:
    stack = FaultStack(tmp_path_factory.mktemp("faults"), tiny_model_dir, s3_endpoint, standin)
    stack.start()
    yield stack
    stack.stop()
