"""`postroom`: the one command that starts every process and talks to the API."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from postroom.settings import DEFAULT_TINY_MODEL_DIR, get_settings
from postroom_cli.client import ApiError, Client
from postroom_cli.jobs_view import print_summary, wait_for_job
from postroom_cli.terminal import console, err

app = typer.Typer(help="Postroom: classify documents in bulk.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys.", no_args_is_help=True)
model_app = typer.Typer(help="Models that need no download.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(model_app, name="model")


def _client(api_url: str | None, key: str | None) -> Client:
    settings = get_settings()
    return Client(api_url or settings.api_url, key or settings.api_key.get_secret_value())


ApiUrl = Annotated[str | None, typer.Option(help="API base URL [POSTROOM_API_URL]")]
ApiKey = Annotated[str | None, typer.Option("--key", help="API key [POSTROOM_API_KEY]")]


@app.command()
def migrate() -> None:
    """Create the database if missing and run `alembic upgrade head`."""
    from postroom.db.migrate import migrate as run_migrations

    created = run_migrations(get_settings().database_url)
    console.print(f"database {'created and ' if created else ''}migrated to head")


@app.command()
def api(
    host: Annotated[str | None, typer.Option(help="bind address")] = None,
    port: Annotated[int | None, typer.Option(help="port")] = None,
) -> None:
    """Run the HTTP API."""
    from api.main import run_api

    settings = get_settings()
    run_api(settings, host=host or settings.api_host, port=port or settings.api_port)


@app.command()
def worker(
    models: Annotated[
        str | None,
        typer.Option(help="model aliases to serve, comma-separated [POSTROOM_WORKER_MODELS]"),
    ] = None,
    queues: Annotated[
        str | None, typer.Option(help="queues (default: one per served alias)")
    ] = None,
    concurrency: Annotated[
        int | None, typer.Option(help="shards in flight [POSTROOM_WORKER_CONCURRENCY]")
    ] = None,
    route: Annotated[
        str, typer.Option(help="gpu (vLLM engines) or spill (the managed API)")
    ] = "gpu",
    loglevel: str = "INFO",
) -> None:
    """Run a worker: `gpu` hosts one long-lived vLLM engine per served model with many shards in
    flight; `spill` classifies through the managed OpenAI-compatible API (POSTROOM_SPILL_*)."""
    from worker.main import run_worker

    if route not in ("gpu", "spill"):
        raise typer.BadParameter("--route is gpu or spill")
    settings = get_settings()
    served = (
        [m.strip() for m in models.split(",") if m.strip()] if models else settings.served_models()
    )
    unknown = [m for m in served if m not in settings.models]
    if unknown:
        raise typer.BadParameter(
            f"unknown model aliases {unknown}; known: {sorted(settings.models)}"
        )
    run_worker(
        settings,
        models=served,
        queues=[q.strip() for q in queues.split(",")] if queues else None,
        concurrency=concurrency or settings.worker_concurrency,
        route=route,
        loglevel=loglevel,
    )


@app.command()
def beat(loglevel: str = "INFO") -> None:
    """Run the periodic tasks (reaper; later router and inbox) with Celery beat."""
    from worker.control import run_beat

    run_beat(get_settings(), loglevel=loglevel)


@app.command()
def flower(
    port: Annotated[int | None, typer.Option(help="port [POSTROOM_FLOWER_PORT]")] = None,
    address: str = "127.0.0.1",
) -> None:
    """Run Flower on the broker, behind basic auth (POSTROOM_FLOWER_BASIC_AUTH=user:password)."""
    from postroom.queue import make_celery

    settings = get_settings()
    auth = settings.flower_basic_auth.get_secret_value()
    if ":" not in auth:
        raise typer.BadParameter(
            "set POSTROOM_FLOWER_BASIC_AUTH=user:password; Flower never runs open"
        )
    make_celery(settings).start(
        [
            "flower",
            f"--port={port or settings.flower_port}",
            f"--address={address}",
            f"--basic-auth={auth}",
            "--persistent=False",
            "--max_tasks=100000",
        ]
    )


@keys_app.command("create")
def keys_create(
    tenant: str, admin: Annotated[bool, typer.Option(help="operator key")] = False
) -> None:
    """Create an API key for TENANT (created if new). The key is the last line of output."""
    from postroom.db.session import make_engine, make_sessionmaker
    from postroom.tenants import create_key

    settings = get_settings()
    engine = make_engine(settings)
    with make_sessionmaker(engine).begin() as session:
        key = create_key(session=session, tenant=tenant, admin=admin)
    engine.dispose()
    err.print(f"API key for tenant {tenant!r} (shown once; store it safely):")
    print(key)


@keys_app.command("revoke")
def keys_revoke(prefix: str) -> None:
    """Revoke every key with this prefix (the 8 hex characters after `pr_`)."""
    from postroom.db.session import make_engine, make_sessionmaker
    from postroom.tenants import revoke_key

    engine = make_engine(get_settings())
    with make_sessionmaker(engine).begin() as session:
        count = revoke_key(session=session, prefix=prefix)
    engine.dispose()
    console.print(f"revoked {count} key(s)")


@model_app.command("tiny")
def model_tiny(
    directory: Annotated[Path, typer.Argument()] = Path(DEFAULT_TINY_MODEL_DIR),
    seed: int = 0,
) -> None:
    """Generate the tiny random-weight decoder and its tokenizer (no download)."""
    from worker.tiny_model import build_model

    build_model(directory, seed=seed)
    console.print(f"tiny model written to {directory}")


@app.command()
def submit(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="JSONL documents")],
    labels: Annotated[str, typer.Option(help="a,b,c or a JSON list of {name, description}")],
    mode: Annotated[str | None, typer.Option(help="generative | embedding")] = None,
    model: Annotated[str | None, typer.Option(help="model alias")] = None,
    decoding: Annotated[str, typer.Option(help="score | choice")] = "score",
    instructions: str | None = None,
    on_invalid: Annotated[str, typer.Option(help="reject | skip")] = "reject",
    spill: str = "auto",
    deadline: Annotated[str | None, typer.Option(help="ISO 8601 or seconds")] = None,
    wait: Annotated[bool, typer.Option(help="wait with a progress bar, then print labels")] = False,
    timeout: Annotated[float, typer.Option(help="seconds to wait")] = 3600.0,
    api_url: ApiUrl = None,
    key: ApiKey = None,
) -> None:
    """Upload a JSONL file as a job. The job id is the last line of output."""
    client = _client(api_url, key)
    params = {
        "labels": labels,
        "mode": mode,
        "model": model,
        "decoding": decoding,
        "instructions": instructions,
        "on_invalid": on_invalid,
        "spill": spill,
        "deadline": deadline,
    }
    try:
        job = client.upload(file, params)
        for warning in job.get("warnings", []):
            err.print(f"[yellow]warning:[/] {warning}")
        if wait:
            job = wait_for_job(client, job["id"], timeout=timeout)
            print_summary(client, job)
    except ApiError as e:
        err.print(f"[red]{e}[/]")
        raise typer.Exit(1) from e
    print(job["id"])


@app.command()
def status(
    job_id: Annotated[str | None, typer.Argument(help="show this job only")] = None,
    once: Annotated[bool, typer.Option(help="print one snapshot and exit")] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="print JSON (one snapshot; implies --once)")
    ] = False,
    interval: Annotated[float, typer.Option(help="seconds between refreshes")] = 1.0,
    api_url: ApiUrl = None,
    key: ApiKey = None,
) -> None:
    """Live view of queues, workers, your jobs (progress, ETA) and spill; or one job."""
    from postroom_cli.status_view import render, run_live

    client = _client(api_url, key)
    try:
        if job_id is None and not (once or as_json):
            run_live(client, console, interval=interval)
            return
        data = client.job(job_id) if job_id else client.status()
    except ApiError as e:
        err.print(f"[red]{e}[/]")
        raise typer.Exit(1) from e
    if as_json:
        print(json.dumps(data, indent=2))
        return
    if job_id is None:
        console.print(render(data))
        return
    jobs = [data]
    table = Table()
    for column in ("id", "status", "model", "total", "succeeded", "failed", "docs/s", "created"):
        table.add_column(column)
    for job in jobs:
        c = job["counts"]
        table.add_row(
            job["id"],
            job["status"],
            job["model"],
            str(c["total"]),
            str(c["succeeded"]),
            str(c["failed"]),
            str(job.get("rate_docs_per_second") or ""),
            job["created_at"][:19],
        )
    console.print(table)


@app.command()
def results(
    job_id: str,
    only_failed: Annotated[bool, typer.Option("--failed", help="only failed documents")] = False,
    api_url: ApiUrl = None,
    key: ApiKey = None,
) -> None:
    """Print a job's results as JSONL."""
    client = _client(api_url, key)
    try:
        for line in client.results(job_id, only_failed=only_failed):
            print(json.dumps(line, ensure_ascii=False))
    except ApiError as e:
        err.print(f"[red]{e}[/]")
        raise typer.Exit(1) from e


@app.command()
def cancel(job_id: str, api_url: ApiUrl = None, key: ApiKey = None) -> None:
    """Cancel a job: what has not started stops; finished results stay."""
    client = _client(api_url, key)
    try:
        job = client.cancel(job_id)
    except ApiError as e:
        err.print(f"[red]{e}[/]")
        raise typer.Exit(1) from e
    console.print(f"job {job['id']}: {job['status']}")


@app.command("eval")
def eval_(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="JSONL with `label`")],
    labels: Annotated[
        str | None, typer.Option(help="a,b,c, a JSON list, or @labels.json (default: sidecar)")
    ] = None,
    model: Annotated[str | None, typer.Option(help="model alias")] = None,
    mode: Annotated[str | None, typer.Option(help="generative | embedding")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="write the report here")] = None,
    api_url: ApiUrl = None,
    key: ApiKey = None,
) -> None:
    """Classify a labelled JSONL through the pipeline; print accuracy, macro-F1, confusion."""
    from postroom_cli.evaluate import run_eval

    client = _client(api_url, key)
    try:
        report, job, elapsed = run_eval(
            client, file, labels=labels, model=model, mode=mode, console=console
        )
    except (ApiError, ValueError) as e:
        err.print(f"[red]{e}[/]")
        raise typer.Exit(1) from e
    data = {
        **report.to_json(),
        "job_id": job["id"],
        "model": job["model"],
        "revision": job["revision"],
        "seconds": round(elapsed, 2),
    }
    if json_out:
        json_out.write_text(json.dumps(data, indent=2))
        console.print(f"report written to {json_out}")


@app.command()
def demo(
    file: Annotated[
        Path | None, typer.Option(help="labelled JSONL (default: the shipped support tickets)")
    ] = None,
    model: Annotated[str | None, typer.Option(help="model alias [POSTROOM_MODEL]")] = None,
    mode: Annotated[str | None, typer.Option(help="generative | embedding")] = None,
    gpu_workers: Annotated[
        int, typer.Option(help="GPU workers to start; 0 sends the job to the managed API")
    ] = 1,
) -> None:
    """Start what is missing (S3, API, worker), classify the sample, print labels and accuracy."""
    from postroom_cli.demo import run_demo
    from postroom_cli.evaluate import SAMPLE

    raise typer.Exit(
        run_demo(
            get_settings(), file=file or SAMPLE, model=model, mode=mode, gpu_workers=gpu_workers
        )
    )


inbox_app = typer.Typer(
    help="The S3 drop folder (POSTROOM_INBOX_PREFIX/inbox/).", no_args_is_help=True
)
app.add_typer(inbox_app, name="inbox")


@inbox_app.command("status")
def inbox_status(
    state: Annotated[
        str | None, typer.Option(help="only seen, ingested, running, done or failed")
    ] = None,
    limit: Annotated[int, typer.Option(help="objects to list, newest first")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """What the drop folder has seen, ingested, is running, finished or failed (and why), read
    from Postgres."""
    from postroom.db.session import make_engine, make_sessionmaker
    from postroom.inbox import inbox_report

    engine = make_engine(get_settings())
    with make_sessionmaker(engine)() as session:
        report = inbox_report(session=session, state=state, limit=limit)
    engine.dispose()
    if as_json:
        print(json.dumps(report, indent=2))
        return
    console.print(" · ".join(f"{name} {count}" for name, count in report["counts"].items()))
    table = Table()
    for column in ("key", "state", "job", "seen", "reason"):
        table.add_column(column, overflow="fold")
    for obj in report["objects"]:
        job = f"{obj['job_id']} ({obj['job_status']})" if obj["job_id"] else ""
        table.add_row(obj["key"], obj["state"], job, obj["seen_at"][:19], obj["reason"] or "")
    console.print(table)
