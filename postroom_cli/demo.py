"""`postroom demo`: start what is missing, classify a demo job through the whole pipeline, report.

Starts moto S3 on loopback when no S3 endpoint is configured, checks that Postgres and Redis answer
(and says in one line how to start them when they don't), migrates, runs `postroom api` and
`postroom worker` as child processes, submits the demo documents and prints the labels.
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path
from urllib.parse import urlparse

from pydantic import SecretStr
from rich.console import Console
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from postroom.db.migrate import migrate
from postroom.db.models import Worker
from postroom.db.session import make_engine, make_sessionmaker
from postroom.settings import Settings
from postroom.tenants import create_key
from postroom_cli.client import ApiError, Client
from postroom_cli.evaluate import run_eval
from postroom_cli.jobs_view import print_summary
from postroom_cli.local import (
    children,
    free_port,
    http_ok,
    postroom_command,
    reachable,
    spawn,
    start_moto,
    wait_until,
)
from postroom_cli.standin import StandinServer

console = Console(stderr=True)

POSTGRES_HINT = (
    "start it: pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start "
    "(or `docker compose up -d postgres`), or set POSTROOM_DATABASE_URL"
)
REDIS_HINT = (
    "start it: redis-server --daemonize yes --port 6379 (or `docker compose up -d redis`), "
    "or set POSTROOM_BROKER_URL"
)


def check_services(settings: Settings) -> list[str]:
    """One line per service that does not answer, saying how to start it."""
    problems = []
    db = urlparse(settings.database_url.replace("+psycopg", ""))
    if not reachable(db.hostname or "127.0.0.1", db.port or 5432):
        problems.append(
            f"Postgres at {db.hostname}:{db.port or 5432} does not answer; {POSTGRES_HINT}"
        )
    broker = urlparse(settings.broker_url)
    if not reachable(broker.hostname or "127.0.0.1", broker.port or 6379):
        problems.append(
            f"Redis at {broker.hostname}:{broker.port or 6379} does not answer; {REDIS_HINT}"
        )
    return problems


def pick_model(settings: Settings, *, model: str | None, mode: str | None) -> str:
    if model:
        return model
    if mode and settings.models[settings.model].mode != mode:
        return next(a for a, spec in settings.models.items() if spec.mode == mode)
    return settings.model


def run_demo(
    settings: Settings, *, file: Path, model: str | None, mode: str | None, gpu_workers: int = 1
) -> int:
    """Classify `file` on a local stack, starting what is missing; the exit code (0 when the
    job ran, 1 when the demo failed, 2 when Postgres or Redis do not answer)."""
    problems = check_services(settings)
    if problems:
        for line in problems:
            console.print(f"[red]✗[/] {line}")
        return 2
    alias = pick_model(settings, model=model, mode=mode)
    env: dict[str, str] = {}
    standin = None
    if gpu_workers == 0 and not settings.spill_base_url:
        standin = StandinServer(free_port()).start()
        settings = _use_standin(settings, env=env, url=standin.url)
    moto = None
    if not settings.s3_endpoint_url:
        moto, endpoint = start_moto()
        settings = _use_moto(settings, env=env, endpoint=endpoint)
    from postroom.storage import Storage

    Storage(settings).ensure_bucket()
    created = migrate(settings.database_url)
    console.print(f"[green]✓[/] Postgres: database {'created, ' if created else ''}migrated")
    port = settings.api_port if not reachable("127.0.0.1", settings.api_port, 0.5) else free_port()
    api_url = f"http://127.0.0.1:{port}"
    logs = Path(tempfile.mkdtemp(prefix="postroom-demo-"))
    engine = make_engine(settings)
    sessions = make_sessionmaker(engine)
    try:
        with children() as procs:
            _start_processes(
                procs, env=env, port=port, alias=alias, gpu_workers=gpu_workers, logs=logs
            )
            _wait_ready(
                procs, api_url=api_url, sessions=sessions, alias=alias, gpu=bool(gpu_workers)
            )
            with sessions.begin() as session:
                key = create_key(session=session, tenant="demo")
            client = Client(api_url, key)
            console.print(f"classifying {file.name} with {alias!r} ({settings.models[alias].mode})")
            report, job, elapsed = run_eval(
                client,
                file,
                labels=None,
                model=alias,
                mode=None,
                console=console,
                spill=None if gpu_workers else "always",
            )
            print_summary(client, job)
            total = job["counts"]["total"]
            console.print(
                f"[bold]accuracy against the sample's truth: {report.accuracy:.1%}[/] "
                f"(macro-F1 {report.macro_f1:.3f}) · {total:,} documents in {elapsed:.1f}s = "
                f"{total / elapsed:,.0f} docs/s end to end\n"
                f"results: s3://{settings.s3_bucket}/results/{job['id']}/ · "
                f"{api_url}/v1/jobs/{job['id']}/results (key: {key})"
            )
    except (ApiError, TimeoutError, RuntimeError) as e:
        console.print(f"[red]demo failed:[/] {e} (logs in {logs})")
        return 1
    finally:
        engine.dispose()
        if moto is not None:
            moto.stop()
        if standin is not None:
            standin.stop()
    return 0


def _use_standin(settings: Settings, *, env: dict[str, str], url: str) -> Settings:
    """Send spill to the stand-in managed API at `url`, in `env` for the children too."""
    env["POSTROOM_SPILL_BASE_URL"] = url
    console.print(f"[green]✓[/] managed API: stand-in on {url} (no GPU workers)")
    return settings.model_copy(update={"spill_base_url": url})


def _use_moto(settings: Settings, *, env: dict[str, str], endpoint: str) -> Settings:
    """Use the moto S3 server at `endpoint`, in `env` for the children too."""
    env.update(
        POSTROOM_S3_ENDPOINT_URL=endpoint,
        POSTROOM_S3_ACCESS_KEY_ID="demo",
        POSTROOM_S3_SECRET_ACCESS_KEY="demo",
    )
    console.print(f"[green]✓[/] S3: moto server on {endpoint} (no POSTROOM_S3_ENDPOINT_URL set)")
    return settings.model_copy(
        update={
            "s3_endpoint_url": endpoint,
            "s3_access_key_id": "demo",
            "s3_secret_access_key": SecretStr("demo"),
        }
    )


def _start_processes(
    procs: list[subprocess.Popen[bytes]],
    *,
    env: dict[str, str],
    port: int,
    alias: str,
    gpu_workers: int,
    logs: Path,
) -> None:
    """`postroom api` on `port`, then `gpu_workers` GPU workers for `alias` (or, with none,
    one spill worker); the API comes first in `procs`, then the workers."""
    procs.append(spawn(postroom_command("api", "--port", str(port)), env=env, log=logs / "api.log"))
    if gpu_workers:
        command = postroom_command("worker", "--models", alias)
    else:
        command = postroom_command("worker", "--route", "spill")
    for _ in range(max(gpu_workers, 1)):
        procs.append(spawn(command, env=env, log=logs / "worker.log"))
    kind = f"{gpu_workers} GPU worker(s) for {alias!r}" if gpu_workers else "a spill worker"
    console.print(f"… starting the API on http://127.0.0.1:{port} and {kind} (logs: {logs})")


def _wait_ready(
    procs: list[subprocess.Popen[bytes]],
    *,
    api_url: str,
    sessions: sessionmaker[Session],
    alias: str,
    gpu: bool,
) -> None:
    """Until the API answers /readyz and a worker has registered (with `alias`'s engine up, for
    GPU workers); raises when the API or the first worker exits first."""
    api, worker = procs[0], procs[1]
    wait_until(lambda: http_ok(f"{api_url}/readyz"), timeout=60, what="API ready", alive=api)

    def worker_ready() -> bool:
        with sessions() as session:
            rows = session.execute(select(Worker.route, Worker.stats)).all()
        if not gpu:
            return any(route == "spill" for route, _ in rows)
        return any(alias in (stats.get("engines") or {}) for _, stats in rows)

    wait_until(worker_ready, timeout=600, what="worker engine started", alive=worker)
    console.print("[green]✓[/] API and worker are up")
