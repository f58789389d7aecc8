"""`postroom demo`: classify a demo job through the whole pipeline on the local deployment.

The deployment is `postroom up`'s (postroom_cli/deployment.py): Postgres and Redis on loopback or
embedded, moto S3, the API, beat and a worker. What the demo started it stops at the end (unless
`--keep`); explicit service URLs that do not answer are reported with how to start them.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

from rich.console import Console

from postroom.settings import Settings
from postroom_cli.client import ApiError, Client
from postroom_cli.deployment import down, load, up
from postroom_cli.evaluate import run_eval
from postroom_cli.jobs_view import print_summary
from postroom_cli.local import free_port, reachable
from postroom_cli.standin import StandinServer

console = Console(stderr=True)

POSTGRES_HINT = (
    "start it: pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start "
    "(or `docker compose up -d postgres`), or set POSTROOM_DATABASE_URL=embedded"
)
REDIS_HINT = (
    "start it: redis-server --daemonize yes --port 6379 (or `docker compose up -d redis`), "
    "or set POSTROOM_BROKER_URL=embedded"
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
    settings: Settings,
    *,
    file: Path,
    model: str | None,
    mode: str | None,
    gpu_workers: int = 1,
    keep: bool = False,
) -> int:
    """Classify `file` on the local deployment (`postroom up`), starting what does not run yet and
    stopping it afterwards unless `keep`; the exit code (0 when the job ran, 1 when the demo
    failed, 2 when Postgres or Redis do not answer)."""
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
        env["POSTROOM_SPILL_BASE_URL"] = standin.url
        console.print(f"[green]✓[/] managed API: stand-in on {standin.url} (no GPU workers)")
    fresh = load(settings) is None
    started: list[str] = []
    try:
        deployment, _ = up(
            settings,
            alias=alias,
            route="gpu" if gpu_workers else "spill",
            workers=max(gpu_workers, 1),
            extra_env=env,
            started=started,
            say=console.print,
        )
        console.print(
            f"[green]✓[/] API and worker are up (started: {', '.join(started) or 'none'})"
        )
        client = Client(deployment.api_url, deployment.key)
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
            f"{total / elapsed:,.0f} docs/s end to end"
        )
        if keep or not started:
            console.print(f"results: {deployment.api_url}/v1/jobs/{job['id']}/results")
    except (ApiError, TimeoutError, RuntimeError) as e:
        console.print(f"[red]demo failed:[/] {e} (logs in {Path(settings.local_dir) / 'logs'})")
        return 1
    finally:
        if not keep:
            stopped = down(settings, roles=None if fresh else started)
            if stopped:
                console.print(f"stopped what the demo started: {', '.join(stopped)}")
        elif started:
            console.print("left running (`postroom down` stops it)")
        if standin is not None:
            standin.stop()
    return 0
