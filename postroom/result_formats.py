"""A job's results as JSONL, CSV or Parquet, encoded a batch at a time from the result lines, so a
million-document job is never held in memory (Parquet is written one row group at a time)."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq

ResultFormat = Literal["jsonl", "csv", "parquet"]
MEDIA_TYPES: dict[str, str] = {
    "jsonl": "application/x-ndjson",
    "csv": "text/csv; charset=utf-8",
    "parquet": "application/vnd.apache.parquet",
}
BASE_COLUMNS = ("id", "label", "confidence", "route", "model", "revision", "error")
# A cascaded document's first answer (empty unless the frontier's answer replaced it), and why
# an escalation failed (the first answer then stands).
CASCADE_COLUMNS = (
    "first_label",
    "first_confidence",
    "first_route",
    "first_model",
    "escalation_error",
)
LINE_COLUMNS = (*BASE_COLUMNS, *CASCADE_COLUMNS)
PROBABILITY_PREFIX = "prob_"
LINES_PER_CHUNK = 500


def probability_column(label: str) -> str:
    """The column of one label's probability: `prob_<label>`."""
    return f"{PROBABILITY_PREFIX}{label}"


def result_columns(labels: Sequence[str]) -> list[str]:
    """The flat columns of CSV and Parquet: the line's fields, then one probability per label."""
    return [*LINE_COLUMNS, *(probability_column(label) for label in labels)]


def flat_row(line: dict[str, Any], labels: Sequence[str]) -> dict[str, Any]:
    """A result line (the JSONL shape) flattened to the columns of `result_columns`."""
    row = _line_values(line)
    distribution = line.get("distribution") or {}
    for label in labels:
        row[probability_column(label)] = distribution.get(label)
    return row


def _line_values(line: dict[str, Any]) -> dict[str, Any]:
    row = {name: line.get(name) for name in BASE_COLUMNS}
    first = line.get("first") or {}
    for name in ("label", "confidence", "route", "model"):
        row[f"first_{name}"] = first.get(name)
    row["escalation_error"] = line.get("escalation_error")
    return row


def _batches(lines: Iterable[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    for line in lines:
        batch.append(line)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def jsonl_chunks(lines: Iterable[dict[str, Any]]) -> Iterator[bytes]:
    for batch in _batches(lines, LINES_PER_CHUNK):
        yield "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in batch).encode()


def csv_chunks(lines: Iterable[dict[str, Any]], labels: Sequence[str]) -> Iterator[bytes]:
    """RFC 4180 CSV with a header; an absent value (no label, no error) is an empty field."""
    columns = result_columns(labels)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for batch in _batches(lines, LINES_PER_CHUNK):
        writer.writerows(flat_row(line, labels) for line in batch)
        yield buffer.getvalue().encode()
        buffer.seek(0)
        buffer.truncate()
    if buffer.tell():
        yield buffer.getvalue().encode()


def parquet_schema(labels: Sequence[str]) -> pa.Schema:
    strings = {
        "id",
        "label",
        "route",
        "model",
        "revision",
        "error",
        "first_label",
        "first_route",
        "first_model",
        "escalation_error",
    }
    return pa.schema(
        [
            (name, pa.string() if name in strings else pa.float64())
            for name in result_columns(labels)
        ]
    )


class _Sink(io.RawIOBase):
    """A write-only file that hands back what was written since the last `take`."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._written = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        chunk = bytes(data)
        self._parts.append(chunk)
        self._written += len(chunk)
        return len(chunk)

    def tell(self) -> int:
        return self._written

    def take(self) -> bytes:
        out = b"".join(self._parts)
        self._parts.clear()
        return out


def parquet_chunks(
    lines: Iterable[dict[str, Any]], labels: Sequence[str], *, row_group: int
) -> Iterator[bytes]:
    """A Parquet file, one row group of `row_group` lines at a time: memory stays at one group."""
    schema = parquet_schema(labels)
    sink = _Sink()
    writer = pq.ParquetWriter(sink, schema, compression="zstd")
    try:
        for batch in _batches(lines, row_group):
            rows = [_line_values(line) for line in batch]
            columns: dict[str, list[Any]] = {
                name: [row[name] for row in rows] for name in LINE_COLUMNS
            }
            for label in labels:
                columns[probability_column(label)] = [
                    (line.get("distribution") or {}).get(label) for line in batch
                ]
            writer.write_table(pa.Table.from_pydict(columns, schema=schema))
            yield sink.take()
    finally:
        writer.close()
    yield sink.take()


def encode_results(
    lines: Iterable[dict[str, Any]],
    *,
    format: ResultFormat,
    labels: Sequence[str],
    row_group: int,
) -> Iterator[bytes]:
    """The results in one format, as chunks of bytes to stream or spool."""
    if format == "csv":
        return csv_chunks(lines, labels)
    if format == "parquet":
        return parquet_chunks(lines, labels, row_group=row_group)
    return jsonl_chunks(lines)
