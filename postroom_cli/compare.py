"""`postroom eval --compare A,B`: two models, or two settings of one, over the same labelled file
through the real pipeline; quality, agreement, calibration and speed side by side, and a gate.

A side is a registry alias, optionally with job parameters in URL query form:
`tiny`, `tiny?decoding=choice`, `minilm?mode=embedding&spill=never`. Engine settings
(`max_model_len`, `engine_options` such as `{"quantization": "fp8"}`) belong to an alias, so a
variant of those is a second alias in POSTROOM_MODELS (`minilm-short`, `smollm2-fp8`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from rich.console import Console
from rich.table import Table

from postroom_cli.evaluate import EvalRun

JOB_PARAMS = ("mode", "decoding", "instructions", "spill")
BINS = 10


@dataclass(frozen=True)
class Side:
    """One side of a comparison: its text as given, the alias, and the job parameters."""

    name: str
    model: str
    params: dict[str, str]

    def job_params(self) -> dict[str, str]:
        return {"model": self.model, **self.params}


def parse_side(text: str) -> Side:
    alias, _, query = text.strip().partition("?")
    if not alias:
        raise ValueError(f"{text!r}: a side starts with a model alias (`tiny?decoding=choice`)")
    params = dict(parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)))
    unknown = sorted(set(params) - set(JOB_PARAMS))
    if unknown:
        raise ValueError(
            f"{text!r}: unknown job parameter {', '.join(unknown)}; a side may set "
            f"{', '.join(JOB_PARAMS)} (engine settings such as max_model_len belong to an "
            "alias: register a second one in POSTROOM_MODELS)"
        )
    return Side(text.strip(), alias, params)


def parse_compare(text: str) -> tuple[Side, Side]:
    parts = text.split(",")
    if len(parts) != 2:
        raise ValueError(f"--compare takes two sides, A,B (got {text!r})")
    return parse_side(parts[0]), parse_side(parts[1])


def reliability(run: EvalRun, bins: int = BINS) -> tuple[float, list[dict[str, float]]]:
    """Expected calibration error of the confidences (documents that failed are left out), and
    the bins it is made of: each with its range, count, mean confidence and accuracy."""
    rows: list[list[tuple[float, bool]]] = [[] for _ in range(bins)]
    for doc_id, truth in run.truth.items():
        label, confidence = run.predicted.get(doc_id, (None, None))
        if label is None or confidence is None:
            continue
        index = min(int(confidence * bins), bins - 1)
        rows[index].append((confidence, label == truth))
    total = sum(len(r) for r in rows)
    ece = 0.0
    table = []
    for index, row in enumerate(rows):
        if not row:
            continue
        confidence = sum(c for c, _ in row) / len(row)
        accuracy = sum(ok for _, ok in row) / len(row)
        ece += abs(accuracy - confidence) * len(row) / total
        table.append(
            {
                "low": index / bins,
                "high": (index + 1) / bins,
                "count": len(row),
                "confidence": round(confidence, 4),
                "accuracy": round(accuracy, 4),
            }
        )
    return round(ece, 4), table


def agreement(a: EvalRun, b: EvalRun) -> float:
    """The share of documents both sides gave the same label (failures count as disagreeing)."""
    same = sum(
        1
        for doc_id in a.truth
        if a.predicted.get(doc_id, (None, None))[0] is not None
        and a.predicted.get(doc_id, (None, None))[0] == b.predicted.get(doc_id, (None, None))[0]
    )
    return round(same / len(a.truth), 4) if a.truth else 0.0


def side_json(side: Side, run: EvalRun) -> dict[str, Any]:
    report = run.report()
    ece, bins = reliability(run)
    return {
        "name": side.name,
        "model": run.job["model"],
        "revision": run.job["revision"],
        "job_id": run.job["id"],
        "total": report.total,
        "failed": report.failed,
        "accuracy": round(report.accuracy, 4),
        "macro_f1": round(report.macro_f1, 4),
        "ece": ece,
        "docs_per_second": round(run.docs_per_second, 2),
        "seconds": round(run.seconds, 2),
        "per_label": report.to_json()["per_label"],
        "reliability": bins,
    }


def compare(
    sides: tuple[Side, Side], runs: tuple[EvalRun, EvalRun], *, max_drop: float | None
) -> dict[str, Any]:
    """The comparison as JSON: each side, B minus A in points, agreement, and the gate."""
    a, b = (side_json(s, r) for s, r in zip(sides, runs, strict=True))
    per_label = {
        label: round(100 * (b["per_label"][label]["f1"] - row["f1"]), 2)
        for label, row in a["per_label"].items()
    }
    delta = {
        "accuracy_points": round(100 * (b["accuracy"] - a["accuracy"]), 2),
        "macro_f1_points": round(100 * (b["macro_f1"] - a["macro_f1"]), 2),
        "ece_points": round(100 * (b["ece"] - a["ece"]), 2),
        "per_label_f1_points": per_label,
        "speed_ratio": round(b["docs_per_second"] / a["docs_per_second"], 3)
        if a["docs_per_second"]
        else None,
    }
    failures = []
    if max_drop is not None:
        for metric in ("accuracy", "macro_f1"):
            drop = -delta[f"{metric}_points"]
            if drop > max_drop:
                failures.append(f"{metric} drops {drop:.2f} points (more than {max_drop:g})")
    return {
        "a": a,
        "b": b,
        "delta": delta,
        "agreement": agreement(*runs),
        "max_drop": max_drop,
        "passed": not failures,
        "failures": failures,
    }


def print_comparison(data: dict[str, Any], console: Console) -> None:
    a, b, delta = data["a"], data["b"], data["delta"]
    table = Table(title=f"A = {a['name']}  ·  B = {b['name']}")
    for column in ("", "A", "B", "B - A"):
        table.add_column(column, justify="left" if not column else "right")
    for key, title, points in (
        ("accuracy", "accuracy", delta["accuracy_points"]),
        ("macro_f1", "macro-F1", delta["macro_f1_points"]),
        ("ece", "calibration error (ECE)", delta["ece_points"]),
    ):
        table.add_row(title, f"{100 * a[key]:.1f}", f"{100 * b[key]:.1f}", f"{points:+.1f} pt")
    table.add_row("failed", str(a["failed"]), str(b["failed"]), "")
    ratio = delta["speed_ratio"]
    table.add_row(
        "docs/s",
        f"{a['docs_per_second']:.1f}",
        f"{b['docs_per_second']:.1f}",
        f"x{ratio:.2f}" if ratio is not None else "",
    )
    console.print(table)
    labels = Table(title="F1 per label")
    for column in ("label", "A", "B", "B - A"):
        labels.add_column(column, justify="left" if column == "label" else "right")
    for label, points in delta["per_label_f1_points"].items():
        labels.add_row(
            label,
            f"{100 * a['per_label'][label]['f1']:.1f}",
            f"{100 * b['per_label'][label]['f1']:.1f}",
            f"{points:+.1f} pt",
        )
    console.print(labels)
    console.print(f"agreement between A and B: {100 * data['agreement']:.1f} % of documents")
    if data["max_drop"] is not None:
        if data["passed"]:
            console.print(f"[green]gate passed[/]: B within {data['max_drop']:g} points of A")
        else:
            console.print(f"[red]gate failed[/]: {'; '.join(data['failures'])}")


def plot_reliability(data: dict[str, Any], path: Path) -> None:
    """A reliability diagram (accuracy against mean confidence per bin, both sides) as PNG."""
    try:
        import matplotlib
    except ImportError as e:
        raise ValueError("--plot needs matplotlib: pip install matplotlib") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey", label="perfectly calibrated")
    for key, marker in (("a", "o"), ("b", "s")):
        side = data[key]
        bins = side["reliability"]
        sizes = [20 + 200 * math.sqrt(row["count"] / side["total"]) for row in bins]
        ax.plot([r["confidence"] for r in bins], [r["accuracy"] for r in bins], alpha=0.6)
        ax.scatter(
            [r["confidence"] for r in bins],
            [r["accuracy"] for r in bins],
            s=sizes,
            marker=marker,
            label=f"{key.upper()} {side['name']} (ECE {side['ece']:.3f})",
        )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (bin mean)")
    ax.set_ylabel("accuracy")
    ax.set_title("reliability (marker area ~ documents in bin)")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
