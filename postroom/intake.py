"""Document intake: validate lines or objects one at a time and cut the valid ones into shards.

Used by inline submission and the streamed upload alike, so both report the same problems with the
same words. Nothing here holds more than one shard of documents in memory.
"""

from __future__ import annotations

import hashlib
import json
import math
import zlib
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from postroom.errors import InvalidInput, PayloadTooLarge
from postroom.settings import Settings

ALLOWED_FIELDS = frozenset({"id", "text", "metadata"})
# The gzip ratio check starts past this many decompressed bytes: a small file of repetitive lines
# may compress very well without being a bomb.
GZIP_RATIO_FLOOR = 1024 * 1024
GUNZIP_OUT_CHUNK = 256 * 1024

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


# -- JSON that Postroom can store: parsed so that duplicate keys and NaN/Infinity stay visible


class JsonObject(dict[str, Any]):
    """A parsed JSON object that remembers the keys it saw more than once (the last one wins)."""

    duplicates: tuple[str, ...] = ()


class NonFinite:
    """`NaN`, `Infinity` or `-Infinity` in the input: not JSON, kept as a marker so that the
    error can name the field it was in."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


def _object(pairs: list[tuple[str, Any]]) -> JsonObject:
    obj = JsonObject(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        duplicates: list[str] = []
        for key, _ in pairs:
            if key in seen and key not in duplicates:
                duplicates.append(key)
            seen.add(key)
        obj.duplicates = tuple(duplicates)
    return obj


def parse_json(text: str | bytes) -> Any:
    """`json.loads` that keeps duplicate keys and NaN/Infinity visible to `json_problem`.

    Raises ValueError (not JSON) or RecursionError (nested about 1,000 levels deep).
    """
    return json.loads(text, object_pairs_hook=_object, parse_constant=NonFinite)


def show(value: str, limit: int = 40) -> str:
    """A user's string made safe to echo in an error (and to store): cut short, with NULs and
    lone surrogates escaped."""
    cut = value[:limit].encode("utf-8", "backslashreplace").decode("utf-8")
    return cut.replace("\x00", "\\x00") + ("…" if len(value) > limit else "")


def text_problem(value: str) -> str | None:
    """Why a string cannot be stored (a NUL, or a lone surrogate from a `\\ud800` escape)."""
    if "\x00" in value:
        return "contains a NUL character (\\u0000); remove it"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        return (
            f"contains a lone surrogate ({show(value[e.start])} at character {e.start}), which "
            "is not valid Unicode; fix the escape sequence or re-encode the text as UTF-8"
        )
    return None


def type_name(value: Any) -> str:
    if isinstance(value, NonFinite):
        return value.name
    return "dict" if isinstance(value, dict) else type(value).__name__


def json_problem(
    value: Any, *, path: str, max_depth: int, level: int = 1
) -> tuple[str, str] | None:
    """The first thing in a parsed JSON value that Postroom cannot store, as (path, reason):
    a NUL or a lone surrogate in a string or a key, NaN/Infinity or an out-of-range number, a
    duplicate key, or objects and lists nested more than `max_depth` levels deep (the value itself
    is at `level`). Iterative, so no input can exhaust the stack."""
    stack: list[tuple[Any, str, int]] = [(value, path, level)]
    while stack:
        item, where, depth = stack.pop()
        if isinstance(item, str):
            reason = text_problem(item)
            if reason:
                return where, reason
        elif isinstance(item, NonFinite):
            return where, f"{item.name} is not valid JSON; send a number or null"
        elif isinstance(item, float) and math.isnan(item):
            return where, "NaN is not a number JSON allows; send a number or null"
        elif isinstance(item, float) and math.isinf(item):
            return where, "number is out of range (it overflows to infinity); send a smaller one"
        elif isinstance(item, dict | list):
            if depth > max_depth:
                return where, (
                    f"nested more than {max_depth} levels deep (POSTROOM_MAX_METADATA_DEPTH); "
                    "flatten it"
                )
            children: list[tuple[Any, str, int]] = []
            if isinstance(item, dict):
                duplicates = getattr(item, "duplicates", ())
                if duplicates:
                    return where, (
                        f"duplicate key {show(duplicates[0])!r} in one object; send each key once"
                    )
                for key, child in item.items():
                    key_text = str(key)
                    child_path = f"{where}.{show(key_text)}" if where else show(key_text)
                    reason = text_problem(key_text)
                    if reason:
                        return child_path, f"key {reason}"
                    children.append((child, child_path, depth + 1))
            else:
                children = [(child, f"{where}[{i}]", depth + 1) for i, child in enumerate(item)]
            stack.extend(reversed(children))
    return None


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
        raw_id = obj.get("id")
        doc_id: str | None
        if raw_id is None:
            doc_id = str(self._line)
        elif isinstance(raw_id, str):
            doc_id = raw_id
        elif isinstance(raw_id, int) and not isinstance(raw_id, bool):
            doc_id = str(raw_id)
        else:
            self._reject(None, "id", f"must be a string or an integer, got {type_name(raw_id)}")
            return
        if not doc_id or len(doc_id) > self.settings.max_id_length:
            self._reject(
                show(doc_id) if doc_id else doc_id,
                "id",
                f"must be 1 to {self.settings.max_id_length} characters (POSTROOM_MAX_ID_LENGTH)",
            )
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
            elif len(self._buffer) + end - start > self.max_bytes:
                out.append(None)  # the same answer however the stream was cut into chunks
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


class LineStream:
    """Bytes as they arrive (gzip or not) → lines → `intake`, within POSTROOM_MAX_UPLOAD_BYTES
    (counted after decompression). Used by the streamed upload and by `input_uri` alike."""

    def __init__(self, intake: Intake, *, gzip: bool, name: str) -> None:
        settings = intake.settings
        self.intake = intake
        self.name = name
        self.max_bytes = settings.max_upload_bytes
        self.bytes = 0
        self.splitter = LineSplitter(settings.max_document_bytes)
        self.gunzip = (
            Gunzip(
                max_bytes=settings.max_upload_bytes, max_ratio=settings.max_gzip_ratio, name=name
            )
            if gzip
            else None
        )

    def feed(self, chunk: bytes) -> None:
        if self.gunzip is None:
            self._lines(chunk)
        else:
            for data in self.gunzip.feed(chunk):
                self._lines(data)

    def end(self) -> None:
        if self.gunzip is not None:
            self.gunzip.end()
        feed_lines(self.intake, self.splitter.end())

    def _lines(self, data: bytes) -> None:
        self.bytes += len(data)
        if self.bytes > self.max_bytes:
            raise PayloadTooLarge(
                f"{self.name} is over {self.max_bytes:,} bytes (POSTROOM_MAX_UPLOAD_BYTES); "
                "split it into smaller uploads",
                details=[{"field": "body", "reason": "size over the limit"}],
            )
        feed_lines(self.intake, self.splitter.feed(data))


def feed_lines(intake: Intake, lines: list[bytes | None]) -> None:
    for line in lines:
        if line is None:
            intake.too_long_line()
        else:
            intake.add_line(line)


class Gunzip:
    """Decompress a (multi-member) gzip stream chunk by chunk, refusing bombs as they go off:
    more than `max_bytes` out (413), more than `max_ratio` times the bytes read once past
    GZIP_RATIO_FLOOR (413), or bytes that are not gzip (422). Holds at most one output chunk."""

    def __init__(self, *, max_bytes: int, max_ratio: int, name: str = "the upload") -> None:
        self.max_bytes = max_bytes
        self.max_ratio = max_ratio
        self.name = name
        self.read = 0
        self.written = 0
        self._inflate = zlib.decompressobj(wbits=zlib.MAX_WBITS | 16)

    def feed(self, chunk: bytes) -> Iterator[bytes]:
        self.read += len(chunk)
        data = chunk
        while True:
            if self._inflate.eof and data:  # the next gzip member starts here
                self._inflate = zlib.decompressobj(wbits=zlib.MAX_WBITS | 16)
            try:
                out = self._inflate.decompress(data, GUNZIP_OUT_CHUNK)
            except zlib.error as e:
                raise InvalidInput(
                    f"{self.name} is not valid gzip ({e}); send it uncompressed, or compress it "
                    "again with gzip",
                    details=[{"field": "Content-Encoding", "reason": "not gzip"}],
                ) from e
            self.written += len(out)
            self._check()
            if out:
                yield out
            data = self._inflate.unused_data if self._inflate.eof else self._inflate.unconsumed_tail
            # A full output chunk may leave output pending inside zlib: drain it before leaving.
            if not data and (self._inflate.eof or len(out) < GUNZIP_OUT_CHUNK):
                return

    def end(self) -> None:
        """Call after the last chunk: a stream cut off mid-member is refused."""
        if self.read and not self._inflate.eof:
            raise InvalidInput(
                f"{self.name} is a truncated gzip stream; send the whole file again",
                details=[{"field": "Content-Encoding", "reason": "truncated gzip"}],
            )

    def _check(self) -> None:
        if self.written > GZIP_RATIO_FLOOR and self.written > self.max_ratio * self.read:
            raise PayloadTooLarge(
                f"{self.name} expands more than {self.max_ratio}x when decompressed "
                "(POSTROOM_MAX_GZIP_RATIO), like a gzip bomb; send it uncompressed or split it",
                details=[{"field": "body", "reason": "gzip ratio over the limit"}],
            )
        if self.written > self.max_bytes:
            raise PayloadTooLarge(
                f"{self.name} decompresses to more than {self.max_bytes:,} bytes "
                "(POSTROOM_MAX_UPLOAD_BYTES); split it into smaller uploads",
                details=[{"field": "body", "reason": "decompressed size over the limit"}],
            )
