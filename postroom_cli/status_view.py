"""`postroom status`: the /v1/status snapshot as a Rich view (queues, workers, jobs, spill)."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

import httpx
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from postroom_cli.client import ApiError, Client


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def queues_table(queues: list[dict[str, Any]]) -> Table:
    table = Table(title="queues", title_justify="left", expand=True)
    columns = ("queue", "waiting shards", "waiting docs", "running shards", "running docs")
    for column in (*columns, "workers"):
        table.add_column(column, justify="left" if column == "queue" else "right")
    for q in queues:
        busy = q["shards"] or q["running_shards"]
        workers = q.get("workers", 0)
        # Work waiting with no live worker: what an autoscaler starting from zero acts on.
        unserved = bool(q["shards"]) and not workers
        table.add_row(
            q["queue"],
            f"{q['shards']:,}",
            f"{q['documents']:,}",
            f"{q['running_shards']:,}",
            f"{q['running_documents']:,}",
            "none: waiting for a worker" if unserved else str(workers),
            style="bold red" if unserved else None if busy else "dim",
        )
    return table


def workers_table(workers: list[dict[str, Any]], per_route: dict[str, int] | None = None) -> Table:
    counts = " · ".join(f"{n} {route}" for route, n in sorted((per_route or {}).items())) or "none"
    title = f"workers alive: {counts}" + ("" if workers else " (details need an admin key)")
    table = Table(title=title, title_justify="left", expand=True)
    for column in ("worker", "route", "models", "heartbeat", "shards", "docs/s", "engine"):
        table.add_column(column, justify="right" if column in ("shards", "docs/s") else "left")
    for w in workers:
        alive = (
            Text("alive", style="green")
            if w["alive"]
            else Text(f"silent {w['heartbeat_age_seconds']:.0f}s", style="red")
        )
        engines = " ".join(
            f"{alias} {e.get('inflight', 0)}/{e.get('max_inflight', 0)}"
            for alias, e in (w.get("engines") or {}).items()
        )
        table.add_row(
            w["name"],
            w["route"],
            ",".join(w["models"]),
            alive,
            str(w["shards_in_flight"]),
            f"{w['docs_per_second']:,.1f}",
            engines,
        )
    return table


def jobs_table(jobs: list[dict[str, Any]]) -> Table:
    table = Table(title="your jobs", title_justify="left", expand=True)
    for column in ("job", "status", "model", "progress", "done", "failed", "docs/s", "ETA"):
        numeric = column in ("done", "failed", "docs/s", "ETA")
        table.add_column(column, justify="right" if numeric else "left")
    for job in jobs:
        c = job["counts"]
        done = c["succeeded"] + c["failed"] + c["cancelled"]
        total = max(c["total"], 1)
        table.add_row(
            job["id"][:8],
            job["status"],
            job["model"],
            ProgressBar(total=total, completed=done, width=30),
            f"{done:,}/{c['total']:,}",
            f"{c['failed']:,}",
            f"{job.get('rate_docs_per_second') or 0:,.1f}",
            _eta(job.get("eta_seconds")) if job["status"] in ("queued", "running") else "",
        )
    return table


def render(snapshot: dict[str, Any]) -> RenderableType:
    """One frame of the live view."""
    spill = snapshot["spill"]
    docs = spill["documents"]
    minutes = spill["window_seconds"] / 60
    routes = " · ".join(f"{route} {count:,} docs" for route, count in sorted(docs.items()))
    when = datetime.fromisoformat(snapshot["generated_at"]).strftime("%H:%M:%S")
    spill_line = Text.from_markup(
        f"[bold]spill[/] last {minutes:.0f} min: {spill['ratio']:.0%} of documents"
        + (f" ({routes})" if routes else " (nothing finished)")
        + f"   [dim]{when}[/]"
    )
    return Group(
        queues_table(snapshot["queues"]),
        workers_table(snapshot["workers"], snapshot.get("workers_alive")),
        jobs_table(snapshot["jobs"]),
        spill_line,
    )


def run_live(client: Client, console: Console, *, interval: float) -> None:
    """Refresh the view every `interval` seconds until Ctrl-C; API errors show and are retried."""
    with Live(render(client.status()), console=console, auto_refresh=False) as live:
        try:
            while True:
                time.sleep(interval)
                try:
                    frame = render(client.status())
                except (ApiError, httpx.HTTPError) as e:
                    frame = Text(f"cannot reach the API: {e}", style="red")
                live.update(frame, refresh=True)
        except KeyboardInterrupt:
            pass
