"""Document intake: validate lines or objects one at a time and cut the valid ones into shards.

Used by every way in (inline, upload, input_uri, drop folder, OpenAI batch), so all report the
same problems with the same words. Nothing here holds more than one shard of documents in memory.
"""

from __future__ import annotations

import hashlib
import json
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from postroom.jsonsafe import json_problem, parse_json, show, type_name
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


class IdSet:
    """The document ids of one job, kept as 64-bit hashes in one flat array (open addressing):
    8 to 16 bytes per id where a `set[str]` costs ~90, so a million-document upload stays flat.

    Two distinct ids collide with probability ~n²/2⁶⁵ (3·10⁻⁸ for a million ids); a collision
    would reject the second id as a duplicate, with its line number, never drop it silently.
    """

    __slots__ = ("_count", "_mask", "_slots")

    def __init__(self, capacity: int = 1024) -> None:
        size = 1 << max(capacity - 1, 1).bit_length()
        self._slots = array("Q", bytes(8 * size))
        self._mask = size - 1
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def __contains__(self, doc_id: object) -> bool:
        return isinstance(doc_id, str) and self._find(_hash64(doc_id))[1]

    def add(self, doc_id: str) -> bool:
        """Add an id; False when it was already there."""
        key = _hash64(doc_id)
        index, found = self._find(key)
        if found:
            return False
        self._slots[index] = key
        self._count += 1
        if self._count * 2 > len(self._slots):
            self._grow()
        return True

    def _find(self, key: int) -> tuple[int, bool]:
        slots, mask = self._slots, self._mask
        index = key & mask
        while True:
            value = slots[index]
            if value == key:
                return index, True
            if value == 0:
                return index, False
            index = (index + 1) & mask

    def _grow(self) -> None:
        old = self._slots
        self._slots = array("Q", bytes(16 * len(old)))
        self._mask = len(self._slots) - 1
        for key in old:
            if key:
                self._slots[self._find(key)[0]] = key


def _hash64(doc_id: str) -> int:
    digest = hashlib.blake2b(doc_id.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") or 1  # 0 marks an empty slot


@dataclass
class Intake:
    """Feed documents in order; full shards go to `sink(shard_no, docs)` as they fill."""

    settings: Settings
    sink: ShardSink
    shard_size: int
    accepted: int = 0
    chars: int = 0
    shard_sizes: list[int] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    rejected_count: int = 0
    # How many rejected lines to keep: None keeps all (on_invalid=skip turns each into a failed
    # result); a refused job (on_invalid=reject) only shows the first few in its error.
    keep_rejected: int | None = None
    _ids: IdSet = field(default_factory=IdSet)
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
            obj = parse_json(text)
        except RecursionError:
            self._reject(
                None,
                None,
                "nested too deeply to parse; flatten the document (metadata may nest "
                f"{self.settings.max_metadata_depth} levels, POSTROOM_MAX_METADATA_DEPTH)",
            )
            return
        except ValueError as e:
            self._reject(None, None, f"not valid JSON ({e}); each line must be one JSON object")
            return
        self._add(obj, size=len(raw))

    def add_object(self, obj: Any) -> None:
        """One document given as an already-parsed object (inline submission; parse the body
        with `parse_json` so that duplicate keys and NaN are caught)."""
        self._line += 1
        self._add(obj, size=None)

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

    def _add(self, obj: Any, *, size: int | None) -> None:
        # Checked in an order that never echoes a string that failed its own check: errors (and,
        # under on_invalid=skip, failed result rows) carry only ids and names that passed.
        if not isinstance(obj, dict):
            self._reject(None, None, f"expected a JSON object, got {type_name(obj)}")
            return
        duplicates = getattr(obj, "duplicates", ())
        if duplicates:
            name = show(duplicates[0])
            self._reject(None, name, f"duplicate key {name!r} in one object; send each field once")
            return
        # One pass over everything: NaN, NUL, lone surrogates, nested duplicates, depth (the
        # document is level 0, so metadata gets max_metadata_depth levels of its own).
        problem = json_problem(obj, path="", max_depth=self.settings.max_metadata_depth, level=0)
        if problem:
            self._reject(None, problem[0] or None, problem[1])
            return
        doc_id = self._doc_id(obj.get("id"))
        if doc_id is None:
            return
        unknown = sorted(set(obj) - ALLOWED_FIELDS)
        if unknown:
            names = [show(name) for name in unknown[:5]]
            self._reject(
                doc_id,
                names[0],
                f"unknown field(s) {names}{' …' if len(unknown) > 5 else ''}; "
                "allowed: id, text, metadata",
            )
            return
        text = obj.get("text")
        if text is None:
            self._reject(doc_id, "text", "missing; each document needs a non-empty 'text' string")
            return
        if not isinstance(text, str):
            self._reject(doc_id, "text", f"must be a string, got {type_name(text)}")
            return
        if not text.strip():
            self._reject(doc_id, "text", "empty; each document needs text")
            return
        metadata = obj.get("metadata")
        if metadata is not None and not isinstance(metadata, dict):
            self._reject(
                doc_id, "metadata", f"must be a JSON object when given, got {type_name(metadata)}"
            )
            return
        if size is None:
            # Inline documents: the same limit as a JSONL line, on the same encoding.
            size = len(json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode())
            if size > self.settings.max_document_bytes:
                self._reject(
                    doc_id,
                    None,
                    f"document is {size:,} bytes, over the limit of "
                    f"{self.settings.max_document_bytes:,} (POSTROOM_MAX_DOCUMENT_BYTES); "
                    "split or shorten it",
                )
                return
        if not self._ids.add(doc_id):
            self._reject(doc_id, "id", "duplicate id; every document id in a job must be unique")
            return
        doc: dict[str, Any] = {"id": doc_id, "text": text, "line": self._line}
        if metadata:
            doc["metadata"] = metadata
        self._buffer.append(doc)
        self.accepted += 1
        self.chars += len(text)
        if len(self._buffer) >= self.shard_size:
            self._flush()

    def _doc_id(self, raw_id: Any) -> str | None:
        """The document's id (its line number when it has none); None once rejected."""
        doc_id: str
        if raw_id is None:
            doc_id = str(self._line)
        elif isinstance(raw_id, str):
            doc_id = raw_id
        elif isinstance(raw_id, int) and not isinstance(raw_id, bool):
            doc_id = str(raw_id)
        else:
            self._reject(None, "id", f"must be a string or an integer, got {type_name(raw_id)}")
            return None
        if not doc_id or len(doc_id) > self.settings.max_id_length:
            self._reject(
                show(doc_id) if doc_id else doc_id,
                "id",
                f"must be 1 to {self.settings.max_id_length} characters (POSTROOM_MAX_ID_LENGTH)",
            )
            return None
        return doc_id

    def _flush(self) -> None:
        shard_no = len(self.shard_sizes)
        docs, self._buffer = self._buffer, []
        self.sink(shard_no, docs)
        self.shard_sizes.append(len(docs))

    def _reject(self, doc_id: str | None, field_name: str | None, reason: str) -> None:
        self.rejected_count += 1
        # Under on_invalid=skip the line becomes a failed result keyed by its id when that id is
        # usable and unique, else by its line number; either way the key is deterministic.
        if doc_id is not None and field_name != "id" and self._ids.add(doc_id):
            result_id = doc_id
        else:
            result_id = f"line:{self._line}"
        # Under on_invalid=skip every rejected line is kept: each one becomes a failed result.
        if self.keep_rejected is None or len(self.rejected) < self.keep_rejected:
            self.rejected.append(Rejected(self._line, doc_id, field_name, reason, result_id))
