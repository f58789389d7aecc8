"""Commands that talk to the API as a tenant: submit, status, results, cancel, delete, eval, demo
(which first starts a local stack to talk to)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from postroom.settings import get_settings
from postroom_cli.client import ApiError, Client
from postroom_cli.jobs_view import print_summary, wait_for_job
from postroom_cli.terminal import console, err

ApiUrl = Annotated[str | None, typer.Option(help="API base URL [POSTROOM_API_URL]")]
ApiKey = Annotated[str | None, typer.Option("--key", help="API key [POSTROOM_API_KEY]")]


def _client(api_url: str | None, key: str | None) -> Client:
    """The API client: options, else POSTROOM_API_URL / POSTROOM_API_KEY, else the deployment
    `postroom up` runs (its URL and key)."""
    settings = get_settings(resolve_services=False)
    if not key and "api_key" not in settings.model_fields_set:
        from postroom_cli.deployment import load

        deployment = load(settings)
        if deployment and deployment.key:
            key = deployment.key
            if "api_url" not in settings.model_fields_set:
                api_url = api_url or deployment.api_url
    return Client(api_url or settings.api_url, key or settings.api_key.get_secret_value())


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


def results(
    job_id: str,
    only_failed: Annotated[bool, typer.Option("--failed", help="only failed documents")] = False,
    format: Annotated[str, typer.Option(help="jsonl | csv | parquet")] = "jsonl",
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="write here (needed for parquet)")
    ] = None,
    api_url: ApiUrl = None,
    key: ApiKey = None,
) -> None:
    """Print a job's results as JSONL, or save them as JSONL, CSV or Parquet with -o FILE."""
    if format not in ("jsonl", "csv", "parquet"):
        err.print(f"[red]--format {format!r}: use jsonl, csv or parquet[/]")
        raise typer.Exit(2)
    if format == "parquet" and output is None:
        err.print("[red]--format parquet is binary: name a file with -o FILE[/]")
        raise typer.Exit(2)
    client = _client(api_url, key)
    try:
        if output is not None:
            with output.open("wb") as out:
                size = client.download_results(job_id, out, format=format, only_failed=only_failed)
            err.print(f"{size:,} bytes written to {output}")
            return
        for line in client.results(job_id, only_failed=only_failed, format=format):
            print(line if isinstance(line, str) else json.dumps(line, ensure_ascii=False))
    except ApiError as e:
        err.print(f"[red]{e}[/]")
        raise typer.Exit(1) from e


def delete(job_id: str, api_url: ApiUrl = None, key: ApiKey = None) -> None:
    """Delete a job: cancel what runs, then remove its rows and every S3 object it owns."""
    client = _client(api_url, key)
    try:
        message = client.delete(job_id)
    except ApiError as e:
        err.print(f"[red]{e}[/]")
        raise typer.Exit(1) from e
    console.print(message)


def cancel(job_id: str, api_url: ApiUrl = None, key: ApiKey = None) -> None:
    """Cancel a job: what has not started stops; finished results stay."""
    client = _client(api_url, key)
    try:
        job = client.cancel(job_id)
    except ApiError as e:
        err.print(f"[red]{e}[/]")
        raise typer.Exit(1) from e
    console.print(f"job {job['id']}: {job['status']}")


def eval_(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="JSONL with `label`")],
    labels: Annotated[
        str | None, typer.Option(help="a,b,c, a JSON list, or @labels.json (default: sidecar)")
    ] = None,
    model: Annotated[str | None, typer.Option(help="model alias")] = None,
    mode: Annotated[str | None, typer.Option(help="generative | embedding")] = None,
    compare: Annotated[
        str | None,
        typer.Option(
            help="A,B: two aliases, or one with job parameters (`tiny,tiny?decoding=choice`), "
            "run one after the other over FILE and compared"
        ),
    ] = None,
    max_drop: Annotated[
        float | None,
        typer.Option(
            help="with --compare: exit 1 when B's accuracy or macro-F1 is below A's by "
            "more than this many points"
        ),
    ] = None,
    plot: Annotated[
        Path | None, typer.Option(help="with --compare: a reliability diagram (PNG) here")
    ] = None,
    cascade: Annotated[
        bool,
        typer.Option(
            "--cascade",
            help="accuracy and cost as a cascade's threshold moves (a table and a PNG)",
        ),
    ] = False,
    cascade_model: Annotated[
        str, typer.Option(help="the cascade's frontier: 'spill' (the managed API) or an alias")
    ] = "spill",
    thresholds: Annotated[
        str | None,
        typer.Option(help="thresholds, e.g. 0,0.5,0.9 (default: 0 to 1 and the deciles)"),
    ] = None,
    png: Annotated[Path, typer.Option(help="where --cascade draws its plot")] = Path("cascade.png"),
    json_out: Annotated[Path | None, typer.Option("--json", help="write the report here")] = None,
    api_url: ApiUrl = None,
    key: ApiKey = None,
) -> None:
    """Classify a labelled JSONL through the pipeline; print accuracy, macro-F1, confusion. With
    --compare A,B: both sides' accuracy, macro-F1, per-label F1, calibration (ECE) and docs/s,
    and how often they agree; --max-drop makes it a quality gate. With --cascade: every document
    is answered by the model and by the frontier, and the table and the PNG show accuracy and $
    per 1,000 documents for each threshold."""
    from postroom_cli.evaluate import run_eval

    if compare is None and (max_drop is not None or plot is not None):
        raise typer.BadParameter("--max-drop and --plot go with --compare A,B")
    if compare is not None and (model or mode):
        raise typer.BadParameter("with --compare, name the models in it: --compare A,B")
    client = _client(api_url, key)
    if compare is not None and cascade:
        raise typer.BadParameter("--compare and --cascade are separate runs; give one")
    if compare is not None:
        _eval_compare(client, file, labels, compare, max_drop, plot, json_out)
        return
    if cascade:
        _eval_cascade(client, file, labels, model, mode, cascade_model, thresholds, png, json_out)
        return
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


def _eval_cascade(
    client: Client,
    file: Path,
    labels: str | None,
    model: str | None,
    mode: str | None,
    cascade_model: str,
    thresholds: str | None,
    png: Path,
    json_out: Path | None,
) -> None:
    from postroom_cli.cascade_eval import run_cascade_eval

    try:
        points = sorted({float(t) for t in thresholds.split(",")}) if thresholds else None
    except ValueError as e:
        err.print(f"[red]--thresholds: {e}; give numbers between 0 and 1, e.g. 0,0.5,0.9[/]")
        raise typer.Exit(2) from e
    try:
        report = run_cascade_eval(
            client,
            file,
            labels=labels,
            model=model,
            mode=mode,
            cascade_model=cascade_model,
            thresholds=points,
            console=console,
            png=png,
        )
    except (ApiError, ValueError) as e:
        err.print(f"[red]{e}[/]")
        raise typer.Exit(1) from e
    if json_out:
        json_out.write_text(json.dumps(report, indent=2))
        console.print(f"report written to {json_out}")


def _eval_compare(
    client: Client,
    file: Path,
    labels: str | None,
    compare: str,
    max_drop: float | None,
    plot: Path | None,
    json_out: Path | None,
) -> None:
    from postroom_cli.compare import compare as compare_runs
    from postroom_cli.compare import parse_compare, plot_reliability, print_comparison
    from postroom_cli.evaluate import run_job

    try:
        sides = parse_compare(compare)
        runs = []
        for side in sides:  # one after the other, so each side's docs/s is its own
            console.print(f"running {side.name} …")
            runs.append(run_job(client, file, labels=labels, params=side.job_params()))
        data = compare_runs(sides, (runs[0], runs[1]), max_drop=max_drop)
        data["file"] = str(file)
        print_comparison(data, console)
        if plot:
            plot_reliability(data, plot)
            console.print(f"reliability diagram written to {plot}")
    except (ApiError, ValueError) as e:
        err.print(f"[red]{e}[/]")
        raise typer.Exit(1) from e
    if json_out:
        json_out.write_text(json.dumps(data, indent=2))
        console.print(f"report written to {json_out}")
    if not data["passed"]:
        raise typer.Exit(1)


def demo(
    file: Annotated[
        Path | None, typer.Option(help="labelled JSONL (default: the shipped support tickets)")
    ] = None,
    model: Annotated[str | None, typer.Option(help="model alias [POSTROOM_MODEL]")] = None,
    mode: Annotated[str | None, typer.Option(help="generative | embedding")] = None,
    gpu_workers: Annotated[
        int, typer.Option(help="GPU workers to start; 0 sends the job to the managed API")
    ] = 1,
    keep: Annotated[
        bool, typer.Option(help="leave what the demo started running (`postroom down` stops it)")
    ] = False,
) -> None:
    """Start what is missing (`postroom up`), classify the sample, print labels and accuracy."""
    from postroom_cli.demo import run_demo
    from postroom_cli.evaluate import SAMPLE

    raise typer.Exit(
        run_demo(
            get_settings(),
            file=file or SAMPLE,
            model=model,
            mode=mode,
            gpu_workers=gpu_workers,
            keep=keep,
        )
    )
