"""`postroom eval`: a labelled JSONL through the real pipeline, scored against its truth."""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from postroom_cli.client import Client
from postroom_cli.jobs_view import wait_for_job
from postroom_cli.quality import Report, print_report, score

SAMPLE = Path(__file__).resolve().parents[1] / "postroom" / "data" / "support_tickets.jsonl"


def labels_param(path: Path, labels: str | None) -> str:
    """The `labels` upload parameter: given inline, `@file.json`, or the file's sidecar
    `<name>.labels.json` (the shipped sample has one, with descriptions)."""
    if labels and labels.startswith("@"):
        return Path(labels[1:]).read_text()
    if labels:
        return labels
    sidecar = path.with_name(path.name.removesuffix(".jsonl") + ".labels.json")
    if sidecar.exists():
        return sidecar.read_text()
    raise ValueError(f"give --labels (no {sidecar.name} next to {path.name})")


def label_names(param: str) -> list[str]:
    text = param.strip()
    if text.startswith("["):
        return [x if isinstance(x, str) else x["name"] for x in json.loads(text)]
    return [part.strip() for part in text.split(",")]


@dataclass
class EvalRun:
    """One job over a labelled file: the truth, what came back, and how long it took."""

    labels: list[str]
    truth: dict[str, str]
    predicted: dict[str, tuple[str | None, float | None]]  # id -> (label, confidence)
    job: dict[str, Any]
    seconds: float

    def report(self) -> Report:
        pairs = [(t, self.predicted.get(i, (None, None))[0]) for i, t in self.truth.items()]
        return score(self.labels, pairs)

    @property
    def docs_per_second(self) -> float:
        return len(self.truth) / self.seconds if self.seconds else 0.0


@contextlib.contextmanager
def labelled_upload(path: Path, labels: str | None) -> Iterator[tuple[Path, str, dict[str, str]]]:
    """The labelled file without its `label` fields (a temporary file, removed after), the
    `labels` parameter, and the truth by document id."""
    param = labels_param(path, labels)
    truth: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as folder:
        upload = Path(folder) / "documents.jsonl"
        with upload.open("w", encoding="utf-8") as out, path.open(encoding="utf-8") as src:
            for number, line in enumerate(src, 1):
                if not line.strip():
                    continue
                row = json.loads(line)
                doc_id = str(row.get("id", number))
                truth[doc_id] = row.pop("label")
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
        yield upload, param, truth


def run_job(
    client: Client,
    path: Path,
    *,
    labels: str | None,
    params: dict[str, Any],
    timeout: float = 3600.0,
) -> EvalRun:
    """Upload the documents without their `label` field with the job parameters `params` (model,
    mode, decoding, …), wait for the job, and collect its labels and confidences."""
    started = time.monotonic()
    with labelled_upload(path, labels) as (upload, param, truth):
        job = client.upload(upload, {**params, "labels": param})
    job = wait_for_job(client, job["id"], timeout=timeout)
    elapsed = time.monotonic() - started
    predicted = {r["id"]: (r["label"], r.get("confidence")) for r in client.results(job["id"])}
    return EvalRun(label_names(param), truth, predicted, job, elapsed)


def run_eval(
    client: Client,
    path: Path,
    *,
    labels: str | None,
    model: str | None,
    mode: str | None,
    console: Console,
    timeout: float = 3600.0,
    spill: str | None = None,
) -> tuple[Report, dict[str, Any], float]:
    """Upload the documents without their `label` field, wait, and score the results."""
    params = {"model": model, "mode": mode, "spill": spill}
    run = run_job(client, path, labels=labels, params=params, timeout=timeout)
    report = run.report()
    print_report(report, console)
    return report, run.job, run.seconds
