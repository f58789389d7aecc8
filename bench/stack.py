"""A private Postroom stack for benchmarks: moto S3, a fresh database, a unique Redis key prefix,
the API, workers and (optionally) `postroom beat`, all started with the documented commands."""

from __future__ import annotations

import json
import secrets
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
from pydantic import SecretStr
from sqlalchemy import func, select

from postroom.db.migrate import migrate
from postroom.db.models import Worker
from postroom.db.session import make_engine, make_sessionmaker
from postroom.settings import ModelSpec, Settings
from postroom.storage import Storage
from postroom.tenants import create_key
from postroom_cli.client import Client
from postroom_cli.local import (
    free_port,
    http_ok,
    postroom_command,
    settings_env,
    spawn,
    start_moto,
    stop,
    wait_until,
)
from worker.tiny_model import build_model

ROOT = Path(__file__).resolve().parents[1]


def bench_settings(**overrides: Any) -> Settings:
    tiny = build_model(ROOT / ".cache" / "models" / "tiny")
    models = {
        **Settings().models,
        "tiny": ModelSpec(path=str(tiny), mode="generative", revision="tiny-seed0"),
    }
    return Settings(models=models, **{"model": "tiny", **overrides})


# How often a bench asks for a job's status: as `postroom jobs wait` does (postroom_cli/jobs_view).
# Times come from the job's own `finished_at`, so this sets only what the polls cost the machine.
POLL_S = 0.5


class Stack:
    def __init__(
        self,
        settings: Settings,
        logs: Path,
        *,
        workers: list[list[str]] | None = None,
        beat: bool = False,
        env: dict[str, str] | None = None,
    ) -> None:
        self.extra_env = env or {}
        self.moto, endpoint = start_moto()
        name = f"postroom_bench_{secrets.token_hex(3)}"
        self.settings = settings.model_copy(
            update={
                "database_url": f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}",
                "broker_url": "redis://127.0.0.1:6379/14",
                "broker_key_prefix": f"bench-{secrets.token_hex(3)}:",
                "s3_endpoint_url": endpoint,
                "s3_access_key_id": "bench",
                "s3_secret_access_key": SecretStr("bench"),
            }
        )
        self.logs = logs
        self.worker_args = workers if workers is not None else [["worker"]]
        self.beat = beat
        self.procs: list[Any] = []

    def __enter__(self) -> Stack:
        migrate(self.settings.database_url)
        Storage(self.settings).ensure_bucket()
        self.env = {**settings_env(self.settings), **self.extra_env}
        port = free_port()
        self.api_url = f"http://127.0.0.1:{port}"
        self.api = spawn(
            postroom_command("api", "--port", str(port)), env=self.env, log=self.logs / "api.log"
        )
        self.procs.append(self.api)
        for i, args in enumerate(self.worker_args):
            self.procs.append(
                spawn(postroom_command(*args), env=self.env, log=self.logs / f"worker{i}.log")
            )
        if self.beat:
            self.procs.append(
                spawn(postroom_command("beat"), env=self.env, log=self.logs / "beat.log")
            )
        wait_until(
            lambda: http_ok(f"{self.api_url}/readyz"), timeout=60, what="API", alive=self.api
        )
        self.engine = make_engine(self.settings)
        self.sessions = make_sessionmaker(self.engine)
        wanted = len(self.worker_args)

        wait_until(lambda: self.workers() >= wanted, timeout=300, what="workers registered")
        self._wait_engines()
        with self.sessions.begin() as session:
            self.key = create_key(session=session, tenant="bench")
        self.client = Client(self.api_url, self.key, timeout=600)
        return self

    def _wait_engines(self) -> None:
        """GPU workers are ready when their engines report stats."""
        gpu = sum(1 for a in self.worker_args if "--route" not in a)
        if self.settings.worker_null_classifier or not gpu:
            return

        def engines() -> bool:
            with self.sessions() as session:
                rows = session.scalars(select(Worker.stats).where(Worker.route == "gpu")).all()
            return sum(1 for s in rows if s.get("engines")) >= gpu

        wait_until(engines, timeout=300, what="engines started")

    def __exit__(self, *exc: object) -> None:
        for proc in reversed(self.procs):
            stop(proc)
        self.engine.dispose()
        self.moto.stop()
        name = self.settings.database_url.rsplit("/", 1)[1]
        with psycopg.connect("postgresql://postgres@127.0.0.1/postgres", autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def workers(self) -> int:
        with self.sessions() as session:
            return int(session.scalar(select(func.count()).select_from(Worker)) or 0)

    def run_job(self, path: Path, docs: int, **params: Any) -> dict[str, Any]:
        """Upload, wait for the job to finish; seconds from the first byte to the job's own
        `finished_at` (the same clock: everything runs on this machine), so the poll interval
        adds nothing to the time."""
        t0 = time.time()
        job = self.client.upload(path, {"labels": json.dumps(LABELS), **params})
        accepted = time.time() - t0
        [job] = self.wait_jobs([job["id"]], timeout=JOB_TIMEOUT_S)
        seconds = datetime.fromisoformat(job["finished_at"]).timestamp() - t0
        done = job["counts"]["succeeded"] + job["counts"]["failed"]
        assert done == docs, job["counts"]
        return {"seconds": seconds, "docs_per_s": docs / seconds, "upload_s": accepted, "job": job}

    def wait_jobs(self, job_ids: list[str], timeout: float) -> list[dict[str, Any]]:
        """Poll until every job has ended; a bench that cannot finish says so instead of
        hanging."""
        end = time.monotonic() + timeout
        results = []
        for job_id in job_ids:
            while (job := self.client.job(job_id))["status"] not in FINAL:
                if time.monotonic() > end:
                    counts = job["counts"]
                    raise TimeoutError(f"job {job_id} not finished after {timeout:.0f}s: {counts}")
                time.sleep(POLL_S)
            results.append(job)
        return results


JOB_TIMEOUT_S = 1800.0
FINAL = ("completed", "failed", "cancelled")

LABELS = [
    {"name": "billing", "description": "invoices, charges, payments and prices"},
    {"name": "technical", "description": "errors, crashes, bugs, login and outages"},
    {"name": "shipping", "description": "deliveries, packages, tracking and late orders"},
    {"name": "account", "description": "passwords, profiles, sign-in and account settings"},
]
