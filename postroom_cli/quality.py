"""Classification quality: accuracy, per-label precision/recall/F1, macro-F1, confusion matrix."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.table import Table


@dataclass
class Report:
    labels: list[str]
    total: int = 0
    correct: int = 0
    failed: int = 0
    confusion: dict[str, Counter[str]] = field(default_factory=dict)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    def per_label(self) -> dict[str, dict[str, float]]:
        out = {}
        for label in self.labels:
            tp = self.confusion.get(label, Counter())[label]
            predicted = sum(row[label] for row in self.confusion.values())
            actual = sum(self.confusion.get(label, Counter()).values())
            precision = tp / predicted if predicted else 0.0
            recall = tp / actual if actual else 0.0
            f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
            out[label] = {"precision": precision, "recall": recall, "f1": f1, "support": actual}
        return out

    @property
    def macro_f1(self) -> float:
        scores = [v["f1"] for v in self.per_label().values() if v["support"]]
        return sum(scores) / len(scores) if scores else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "correct": self.correct,
            "failed": self.failed,
            "accuracy": round(self.accuracy, 4),
            "macro_f1": round(self.macro_f1, 4),
            "per_label": {
                k: {m: round(v, 4) for m, v in row.items()} for k, row in self.per_label().items()
            },
            "confusion": {k: dict(v) for k, v in self.confusion.items()},
        }


def score(labels: Sequence[str], pairs: Sequence[tuple[str, str | None]]) -> Report:
    """`pairs` are (true label, predicted label or None when the document failed)."""
    report = Report(labels=list(labels))
    for truth, predicted in pairs:
        report.total += 1
        if predicted is None:
            report.failed += 1
            predicted = "(failed)"
        report.confusion.setdefault(truth, Counter())[predicted] += 1
        report.correct += truth == predicted
    return report


def print_report(report: Report, console: Console) -> None:
    table = Table(title="per label")
    for column in ("label", "precision", "recall", "F1", "support"):
        table.add_column(column, justify="right" if column != "label" else "left")
    for label, row in report.per_label().items():
        table.add_row(
            label,
            f"{row['precision']:.3f}",
            f"{row['recall']:.3f}",
            f"{row['f1']:.3f}",
            f"{int(row['support'])}",
        )
    console.print(table)
    matrix = Table(title="confusion (rows: truth, columns: predicted)")
    matrix.add_column("")
    columns = [*report.labels, *(["(failed)"] if report.failed else [])]
    for label in columns:
        matrix.add_column(label[:10], justify="right")
    for truth in report.labels:
        counts = report.confusion.get(truth, Counter())
        matrix.add_row(
            truth,
            *(
                f"[bold green]{counts[p]}[/]"
                if p == truth
                else (str(counts[p]) if counts[p] else "·")
                for p in columns
            ),
        )
    console.print(matrix)
    console.print(
        f"[bold]accuracy {report.accuracy:.1%}[/] ({report.correct}/{report.total}) · "
        f"macro-F1 {report.macro_f1:.3f}" + (f" · failed {report.failed}" if report.failed else "")
    )
