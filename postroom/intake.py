"""Document intake: validate lines or objects one at a time and cut the valid ones into shards.

Used by inline submission and the streamed upload alike, so both report the same problems with the
same words. Nothing here holds more than one shard of documents in memory.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from postroom.settings import Settings

ALLOWED_FIELDS = frozenset({"id", "text", "metadata"})

ShardSink = Callable[[int, list[dict[str, Any]]], None]


@dataclass
class Rejected:
    line: int
    id: str | None
    field: str | None
    reason: str
    result_id: str

    def detail(self) -> dict[str, Any]:
        out: dict[str, Any] = {"line": self.line, "reason": self.reason}
        if self.field:
            out["field"] = self.field
        if self.id is not None:
            out["id"] = self.id
        return out


class LineTooLong(ValueError):
    pass


@dataclass
class Intake:
    """Feed documents in order; full shards go to `sink(shard_no, docs)` as they fill."""

    settings: Settings
    sink: ShardSink
    shard_size: int
    accepted: int = 0
    shard_sizes: list[int] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    rejected_count: int = 0
    _ids: set[str] = field(default_factory=set)
    _buffer: list[dict[str, Any]] = field(default_factory=list)
    _line: int = 0

    @property
    def lines(self) -> int:
        return self._line

    def add_line(self, raw: bytes) -> None:
        """One JSONL line (without its newline). Blank lines are skipped but counted."""
        self._line += 1
        if not raw.strip():
            return
        if len(raw) > self.settings.max_document_bytes:
            self._reject(
                None,
                None,
                f"line is {len(raw):,} bytes, over the limit of "
                f"{self.settings.max_document_bytes:,} (POSTROOM_MAX_DOCUMENT_BYTES); "
                "split or shorten the document",
            )
            return
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            self._reject(None, None, f"not UTF-8 (byte {e.start}); re-encode the file as UTF-8")
            return
        try:
            obj = json.loads(text, parse_constant=_reject_constant)
        except ValueError as e:
            self._reject(None, None, f"not valid JSON ({e}); each line must be one JSON object")
            return
        self._add(obj)

    def add_object(self, obj: Any) -> None:
        """One document given as an already-parsed object (inline submission)."""
        self._line += 1
        self._add(obj)

    def too_long_line(self) -> None:
        """The current line overran the byte limit before its newline; it is skipped unread."""
        self._line += 1
        self._reject(
            None,
            None,
            f"line is over the limit of {self.settings.max_document_bytes:,} bytes "
            "(POSTROOM_MAX_DOCUMENT_BYTES); split or shorten the document",
        )

    def finish(self) -> None:
        if self._buffer:
            self._flush()

    def details(self) -> list[dict[str, Any]]:
        return [r.detail() for r in self.rejected]

    def _add(self, obj: Any) -> None:
        if not isinstance(obj, dict):
            self._reject(None, None, f"expected a JSON object, got {type(obj).__name__}")
            return
        unknown = sorted(set(obj) - ALLOWED_FIELDS)
        raw_id = obj.get("id")
        doc_id: str | None
        if raw_id is None:
            doc_id = str(self._line)
        elif isinstance(raw_id, str | int) and not isinstance(raw_id, bool):
            doc_id = str(raw_id)
        else:
            self._reject(None, "id", "must be a string or an integer")
            return
        if unknown:
            self._reject(
                doc_id, unknown[0], f"unknown field(s) {unknown}; allowed: id, text, metadata"
            )
            return
        if not doc_id or len(doc_id) > self.settings.max_id_length:
            self._reject(
                doc_id[:40] + "…" if doc_id else doc_id,
                "id",
                f"must be 1 to {self.settings.max_id_length} characters (POSTROOM_MAX_ID_LENGTH)",
            )
            return
        text = obj.get("text")
        if text is None:
            self._reject(doc_id, "text", "missing; each document needs a non-empty 'text' string")
            return
        if not isinstance(text, str):
            self._reject(doc_id, "text", f"must be a string, got {type(text).__name__}")
            return
        if not text.strip():
            self._reject(doc_id, "text", "empty; each document needs text")
            return
        if "\x00" in text:
            self._reject(doc_id, "text", "contains a NUL character; remove it")
            return
        metadata = obj.get("metadata")
        if metadata is not None and not isinstance(metadata, dict):
            self._reject(doc_id, "metadata", "must be a JSON object when given")
            return
        if doc_id in self._ids:
            self._reject(doc_id, "id", "duplicate id; every document id in a job must be unique")
            return
        self._ids.add(doc_id)
        doc: dict[str, Any] = {"id": doc_id, "text": text, "line": self._line}
        if metadata:
            doc["metadata"] = metadata
        self._buffer.append(doc)
        self.accepted += 1
        if len(self._buffer) >= self.shard_size:
            self._flush()

    def _flush(self) -> None:
        shard_no = len(self.shard_sizes)
        docs, self._buffer = self._buffer, []
        self.sink(shard_no, docs)
        self.shard_sizes.append(len(docs))

    def _reject(self, doc_id: str | None, field_name: str | None, reason: str) -> None:
        self.rejected_count += 1
        # Under on_invalid=skip the line becomes a failed result keyed by its id when that id is
        # usable and unique, else by its line number; either way the key is deterministic.
        if doc_id is not None and field_name != "id" and doc_id not in self._ids:
            self._ids.add(doc_id)
            result_id = doc_id
        else:
            result_id = f"line:{self._line}"
        # Every rejected line is kept (not only the first N) because under on_invalid=skip each one
        # becomes a failed result; the error body shows the first N.
        self.rejected.append(Rejected(self._line, doc_id, field_name, reason, result_id))


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


class LineSplitter:
    """Cut a byte stream into lines without ever buffering more than `max_bytes` of one line.

    `feed()` returns complete lines; a line that overruns the limit comes back once as None and the
    rest of it is skipped up to its newline.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._buffer = bytearray()
        self._skipping = False

    def feed(self, chunk: bytes) -> list[bytes | None]:
        out: list[bytes | None] = []
        start = 0
        while True:
            end = chunk.find(b"\n", start)
            if end < 0:
                break
            if self._skipping:
                self._skipping = False
            else:
                self._buffer += chunk[start:end]
                out.append(bytes(self._buffer).rstrip(b"\r"))
            self._buffer.clear()
            start = end + 1
        if not self._skipping:
            self._buffer += chunk[start:]
            if len(self._buffer) > self.max_bytes:
                out.append(None)
                self._buffer.clear()
                self._skipping = True
        return out

    def end(self) -> list[bytes | None]:
        if self._skipping or not self._buffer:
            return []
        line = bytes(self._buffer).rstrip(b"\r")
        self._buffer.clear()
        return [line]


def feed_lines(intake: Intake, lines: list[bytes | None]) -> None:
    for line in lines:
        if line is None:
            intake.too_long_line()
        else:
            intake.add_line(line)
