"""Commands that run Postroom's processes: migrate, api, worker, beat, flower, and `model tiny`
(the model those processes serve when nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from postroom.settings import DEFAULT_TINY_MODEL_DIR, Settings, get_settings
from postroom_cli.terminal import console, err

model_app = typer.Typer(
    help="Models that need no download, and pinned weights.", no_args_is_help=True
)


def migrate() -> None:
    """Create the database if missing and run `alembic upgrade head`."""
    from postroom.db.migrate import migrate as run_migrations

    created = run_migrations(get_settings().database_url)
    console.print(f"database {'created and ' if created else ''}migrated to head")


def api(
    host: Annotated[str | None, typer.Option(help="bind address")] = None,
    port: Annotated[int | None, typer.Option(help="port")] = None,
) -> None:
    """Run the HTTP API."""
    from api.main import run_api

    settings = get_settings()
    run_api(settings, host=host or settings.api_host, port=port or settings.api_port)


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
    gpus: Annotated[
        str | None,
        typer.Option(
            help="`all` or GPU indices (0,1): one supervised worker process per GPU, or per "
            "group of tensor_parallel_size x data_parallel_size GPUs"
        ),
    ] = None,
    loglevel: str = "INFO",
) -> None:
    """Run a worker: `gpu` hosts one long-lived vLLM engine per served model with many shards in
    flight; `spill` classifies through the managed OpenAI-compatible API (POSTROOM_SPILL_*)."""
    from postroom.gpus import GpuConfigError
    from postroom.pins import PinMismatch
    from worker.main import run_worker
    from worker.spill import SpillConfigError

    if route not in ("gpu", "spill"):
        raise typer.BadParameter("--route is gpu or spill")
    if gpus is not None and route != "gpu":
        raise typer.BadParameter("--gpus is for --route gpu")
    settings = get_settings()
    served = (
        [m.strip() for m in models.split(",") if m.strip()] if models else settings.served_models()
    )
    unknown = [m for m in served if m not in settings.models]
    if unknown:
        raise typer.BadParameter(
            f"unknown model aliases {unknown}; known: {sorted(settings.models)}"
        )
    if gpus is not None:
        args = ["--models", ",".join(served), "--loglevel", loglevel]
        args += ["--queues", queues] if queues else []
        args += ["--concurrency", str(concurrency)] if concurrency else []
        _supervise(settings, gpus, served, args)
        return
    try:
        run_worker(
            settings,
            models=served,
            queues=[q.strip() for q in queues.split(",")] if queues else None,
            concurrency=concurrency or settings.worker_concurrency,
            route=route,
            loglevel=loglevel,
        )
    except GpuConfigError as e:
        raise typer.BadParameter(str(e), param_hint="--models") from e
    except (PinMismatch, SpillConfigError) as e:
        err.print(f"[red]refusing to start:[/] {e}")
        raise typer.Exit(3) from e


def _supervise(settings: Settings, gpus: str, served: list[str], worker_args: list[str]) -> None:
    from postroom.gpus import GpuConfigError, plan_groups, visible_gpus
    from postroom.logs import configure_logging
    from worker.supervisor import Supervisor

    configure_logging("INFO")
    try:
        groups = plan_groups(
            gpus,
            visible=visible_gpus(settings.visible_gpus),
            specs={alias: settings.model_spec(alias) for alias in served},
        )
    except GpuConfigError as e:
        raise typer.BadParameter(str(e), param_hint="--gpus") from e
    supervisor = Supervisor(settings, groups, worker_args=worker_args)
    supervisor.install_signal_handlers()
    supervisor.run()


def beat(loglevel: str = "INFO") -> None:
    """Run the control process (router, reaper, S3 drop folder) with Celery beat."""
    from control.beat import run_beat

    run_beat(get_settings(), loglevel=loglevel)


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


@model_app.command("tiny")
def model_tiny(
    directory: Annotated[Path, typer.Argument()] = Path(DEFAULT_TINY_MODEL_DIR),
    seed: int = 0,
) -> None:
    """Generate the tiny random-weight decoder and its tokenizer (no download)."""
    from worker.tiny_model import build_model

    build_model(directory, seed=seed)
    console.print(f"tiny model written to {directory}")


@model_app.command("convert")
def model_convert(
    source: Annotated[Path, typer.Argument(help="a GGUF file", exists=True, dir_okay=False)],
    directory: Annotated[Path, typer.Argument(help="where the checkpoint goes")],
) -> None:
    """Unpack a GGUF file into a safetensors checkpoint (bf16) plus its tokenizer, which vLLM
    loads; register DIR in POSTROOM_MODELS with the revision printed."""
    from worker.gguf_model import ConversionError, convert_gguf

    try:
        made = convert_gguf(source, directory)
    except ConversionError as e:
        err.print(f"[red]{e}[/]")
        raise typer.Exit(1) from e
    console.print(f"checkpoint written to {directory}")
    print(f"revision: {made['source']}@sha256:{made['sha256']}")


@model_app.command("pin")
def model_pin(alias: Annotated[str, typer.Argument(help="a registry alias")]) -> None:
    """Record the content digest of ALIAS's files (weights, config, tokenizer) as its revision:
    jobs and results carry it, and a worker whose files no longer match refuses to start."""
    from postroom.db.session import make_engine, make_sessionmaker
    from postroom.model_files import content_digest
    from postroom.pins import pin_model
    from worker.runtime import prepare_models

    settings = get_settings()
    if alias not in settings.models:
        raise typer.BadParameter(f"unknown model alias {alias!r}; known: {sorted(settings.models)}")
    prepare_models(settings, [alias])
    path = settings.model_path(alias)
    try:
        digest = content_digest(Path(path))
    except FileNotFoundError as e:
        raise typer.BadParameter(str(e), param_hint="ALIAS") from e
    engine = make_engine(settings)
    try:
        with make_sessionmaker(engine).begin() as session:
            pin_model(session=session, alias=alias, digest=digest, path=path)
    finally:
        engine.dispose()
    console.print(f"{alias} pinned to {digest} ({path})")


def up(
    model: Annotated[str | None, typer.Option(help="model alias the worker serves")] = None,
    route: Annotated[str, typer.Option(help="gpu (vLLM) or spill (the managed API)")] = "gpu",
) -> None:
    """Start the local deployment in the background (database, broker, S3, API, beat, a worker)
    and print its URLs and a key; a second `up` reuses what runs. `postroom down` stops it."""
    from postroom_cli.deployment import up as start

    if route not in ("gpu", "spill"):
        raise typer.BadParameter("--route is gpu or spill")
    settings = get_settings()
    if model and model not in settings.models:
        raise typer.BadParameter(f"unknown model alias {model!r}; known: {sorted(settings.models)}")
    deployment, started = start(
        settings, alias=model or settings.model, route=route, say=console.print
    )
    reused = "" if started else " (all of it was already running)"
    console.print(f"[green]✓[/] Postroom is up{reused}: started {', '.join(started) or 'nothing'}")
    print(f"API:      {deployment.api_url}  (docs: {deployment.api_url}/docs)")
    print(f"S3:       {deployment.s3_endpoint or settings.s3_endpoint_url}")
    print(f"database: {deployment.database_url}")
    print(f"broker:   {deployment.broker_url}")
    print(f"logs:     {deployment.logs}")
    print(f"key:      {deployment.key}")
    print(
        "`postroom submit FILE --labels a,b --wait` uses this API and key; `postroom down` stops it"
    )


def down() -> None:
    """Stop what `postroom up` started (processes, and the embedded Postgres and Redis)."""
    from postroom_cli.deployment import down as stop

    stopped = stop(get_settings(resolve_services=False))
    console.print(f"[green]✓[/] stopped {', '.join(stopped)}" if stopped else "nothing was running")
