"""A job on the terminal: a progress bar while it runs, a table of its labels once it is done.

Shared by `postroom submit --wait`, `postroom eval` and `postroom demo`.
"""

from __future__ import annotations

import collections
import time
from typing import Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from postroom_cli.client import Client
from postroom_cli.terminal import console, err

FINISHED = ("completed", "failed", "cancelled")


def wait_for_job(client: Client, job_id: str, *, timeout: float) -> dict[str, Any]:
    """Poll the job with a progress bar until it finishes or `timeout` passes."""
    deadline = time.monotonic() + timeout
    job = client.job(job_id)
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err, transient=False) as progress:
        task = progress.add_task(job["status"], total=job["counts"]["total"], rate="")
        while True:
            counts = job["counts"]
            rate = job.get("rate_docs_per_second")
            progress.update(
                task,
                completed=counts["succeeded"] + counts["failed"] + counts["cancelled"],
                description=job["status"],
                rate=f"{rate:,.0f} docs/s" if rate else "",
            )
            if job["status"] in FINISHED:
                return job
            if time.monotonic() > deadline:
                err.print(f"[red]job {job_id} did not finish within {timeout:.0f}s[/]")
                raise typer.Exit(1)
            time.sleep(0.5)
            job = client.job(job_id)


def print_summary(client: Client, job: dict[str, Any]) -> collections.Counter[str]:
    """A table of label counts (and failures by reason) for a finished job."""
    labels: collections.Counter[str] = collections.Counter()
    errors: collections.Counter[str] = collections.Counter()
    for line in client.results(job["id"]):
        if line["error"]:
            errors[line["error"].split(":")[0]] += 1
        else:
            labels[line["label"]] += 1
    table = Table(title=f"job {job['id']}: {job['status']}")
    table.add_column("label")
    table.add_column("documents", justify="right")
    table.add_column("share", justify="right")
    total = sum(labels.values()) or 1
    for name, count in labels.most_common():
        table.add_row(name, f"{count:,}", f"{count / total:.1%}")
    for reason, count in errors.most_common():
        table.add_row(f"[red]failed: {reason}[/]", f"{count:,}", "")
    console.print(table)
    counts = job["counts"]
    console.print(
        f"total {counts['total']:,} · succeeded {counts['succeeded']:,} · "
        f"failed {counts['failed']:,} · rate {job.get('rate_docs_per_second') or 0:,.1f} docs/s"
    )
    spend = job.get("spend") or {}
    routes = [
        f"{r}: {v['docs']:,} docs ${v['cost']:.4f}"
        for r, v in spend.items()
        if r in ("gpu", "spill")
    ]
    if routes:
        console.print(
            f"routes {' · '.join(routes)} · ${spend.get('per_1000_docs') or 0:.4f} per 1,000 docs"
        )
    return labels
