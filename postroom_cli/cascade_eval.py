"""`postroom eval --cascade`: how accuracy and cost move with a cascade's threshold, to pick it.

One job answers every document on both routes (a cascade with `below: 1`, no caps); every
threshold is then replayed from the two answers: a document whose first confidence is under the
threshold takes the frontier's answer and costs the frontier's price. The table and the PNG show
accuracy, the share escalated and $ per 1,000 documents per threshold.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from postroom_cli.client import Client
from postroom_cli.evaluate import labelled_upload
from postroom_cli.jobs_view import wait_for_job

DEFAULT_THRESHOLDS = (0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)


@dataclass(frozen=True)
class Answers:
    """One document's truth, first answer and frontier answer (None when there is none)."""

    truth: str
    first: str | None
    confidence: float | None
    frontier: str | None


@dataclass(frozen=True)
class Point:
    """One threshold's outcome."""

    below: float
    accuracy: float
    escalated: int
    escalated_share: float
    cost: float
    per_1000_docs: float


def answers_of(lines: Sequence[dict[str, Any]], truth: dict[str, str]) -> list[Answers]:
    """Both answers of each labelled document from its result line."""
    out = []
    for line in lines:
        doc_id = str(line["id"])
        if doc_id not in truth:
            continue
        first = line.get("first")
        if first:
            out.append(Answers(truth[doc_id], first["label"], first["confidence"], line["label"]))
        else:  # not escalated (an error, no confidence, or the escalation failed)
            out.append(Answers(truth[doc_id], line["label"], line.get("confidence"), None))
    return out


def sweep(
    answers: Sequence[Answers],
    thresholds: Sequence[float],
    *,
    first_cost: float,
    frontier_cost_per_doc: float,
) -> list[Point]:
    """Accuracy and cost at each threshold, replayed from both answers."""
    points = []
    n = len(answers)
    for below in thresholds:
        correct = escalated = 0
        for a in answers:
            up = a.frontier is not None and a.confidence is not None and a.confidence < below
            escalated += up
            correct += (a.frontier if up else a.first) == a.truth
        cost = first_cost + escalated * frontier_cost_per_doc
        points.append(
            Point(
                below=below,
                accuracy=round(correct / n, 4) if n else 0.0,
                escalated=escalated,
                escalated_share=round(escalated / n, 4) if n else 0.0,
                cost=round(cost, 6),
                per_1000_docs=round(cost / n * 1000, 6) if n else 0.0,
            )
        )
    return points


def default_thresholds(answers: Sequence[Answers]) -> list[float]:
    """The fixed grid plus the deciles of the first confidences, so the curve has points
    where the model's confidences actually lie (a small model's may all sit in 0.3-0.5)."""
    confidences = sorted(a.confidence for a in answers if a.confidence is not None)
    deciles = {
        round(confidences[min(len(confidences) - 1, len(confidences) * k // 10)], 3)
        for k in range(1, 10)
        if confidences
    }
    return sorted({*DEFAULT_THRESHOLDS, *deciles})


def run_cascade_eval(
    client: Client,
    path: Path,
    *,
    labels: str | None,
    model: str | None,
    mode: str | None,
    cascade_model: str,
    thresholds: Sequence[float] | None,
    console: Console,
    png: Path | None,
    timeout: float = 3600.0,
) -> dict[str, Any]:
    """Run the file once with every document asked on both routes, then sweep the thresholds;
    print the table, draw the PNG, return the report."""
    cascade = {"below": 1.0, "model": cascade_model, "max_share": 1.0}
    params = {"model": model, "mode": mode, "cascade": json.dumps(cascade)}
    with labelled_upload(path, labels) as (upload, param, truth):
        job = client.upload(upload, {"labels": param, **params})
    job = wait_for_job(client, job["id"], timeout=timeout)
    lines = list(client.results(job["id"]))
    answers = answers_of(lines, truth)
    spend, summary = job.get("spend") or {}, job.get("cascade") or {}
    frontier_route = summary.get("route", "spill")
    first_cost = sum(
        row["cost"]
        for route, row in spend.items()
        if isinstance(row, dict) and route != frontier_route
    )
    escalated = int(summary.get("escalated") or 0)
    per_doc = float(summary.get("cost") or 0.0) / escalated if escalated else 0.0
    if thresholds is None:
        thresholds = default_thresholds(answers)
    points = sweep(answers, thresholds, first_cost=first_cost, frontier_cost_per_doc=per_doc)
    print_sweep(points, console)
    if png is not None:
        try:
            draw(points, png, title=f"{path.name}: {job['model']} → {summary.get('model', '?')}")
            console.print(f"plot written to {png}")
        except ImportError:
            console.print("no plot: matplotlib is not installed (pip install matplotlib)")
    return {
        "job_id": job["id"],
        "model": job["model"],
        "frontier": {"route": frontier_route, "model": summary.get("model")},
        "documents": len(answers),
        "frontier_answered": sum(1 for a in answers if a.frontier is not None),
        "first_route_cost": round(first_cost, 6),
        "frontier_cost_per_doc": round(per_doc, 8),
        "points": [asdict(p) for p in points],
    }


def print_sweep(points: Sequence[Point], console: Console) -> None:
    table = Table(title="cascade: accuracy and cost by threshold (escalate when confidence < t)")
    for column in ("t", "escalated", "share", "accuracy", "cost $", "$ / 1,000 docs"):
        table.add_column(column, justify="right")
    for p in points:
        table.add_row(
            f"{p.below:g}",
            f"{p.escalated:,}",
            f"{p.escalated_share:.1%}",
            f"{p.accuracy:.1%}",
            f"{p.cost:.6f}",
            f"{p.per_1000_docs:.6f}",
        )
    console.print(table)


def draw(points: Sequence[Point], png: Path, *, title: str) -> None:
    """Accuracy (left axis) and $ per 1,000 documents (right axis) against the threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, accuracy_axis = plt.subplots(figsize=(7, 4))
    xs = [p.below for p in points]
    accuracy_axis.plot(xs, [p.accuracy for p in points], marker="o", color="tab:blue")
    accuracy_axis.set_xlabel("threshold t (escalate documents with confidence < t)")
    accuracy_axis.set_ylabel("accuracy", color="tab:blue")
    accuracy_axis.set_ylim(0, 1.02)
    cost_axis = accuracy_axis.twinx()
    cost_axis.plot(xs, [p.per_1000_docs for p in points], marker="s", color="tab:red")
    cost_axis.set_ylabel("$ per 1,000 documents", color="tab:red")
    accuracy_axis.set_title(title)
    figure.tight_layout()
    figure.savefig(png, dpi=100)
    plt.close(figure)
