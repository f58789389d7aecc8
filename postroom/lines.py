"""Bytes to lines: cut a stream into JSONL lines within a per-line limit, and the one gunzip (gzip
uploads, `input_uri` objects and drop-folder files all decompress through `Gunzip`, with the same
bomb checks). Lines go to a `LineSink` (an `Intake`)."""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

from postroom.errors import InvalidInput, PayloadTooLarge
from postroom.settings import Settings

# The gzip ratio check starts past this many decompressed bytes: a small file of repetitive lines
# may compress very well without being a bomb.
GZIP_RATIO_FLOOR = 1024 * 1024
GUNZIP_OUT_CHUNK = 256 * 1024


class LineSink(Protocol):
    """Where lines go (an `Intake`): one call per line, or one per line that overran the limit."""

    settings: Settings

    def add_line(self, raw: bytes) -> None: ...

    def too_long_line(self) -> None: ...


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


@dataclass(frozen=True)
class StreamLimits:
    """How much a stream of documents may hold after decompression and how much gzip may
    expand it, with the settings that say so (named in errors)."""

    max_bytes: int
    max_ratio: int
    bytes_setting: str = "POSTROOM_MAX_UPLOAD_BYTES"
    ratio_setting: str = "POSTROOM_MAX_GZIP_RATIO"

    @classmethod
    def uploads(cls, settings: Settings) -> StreamLimits:
        """Uploads, `input_uri` objects and batch files."""
        return cls(settings.max_upload_bytes, settings.max_gzip_ratio)

    @classmethod
    def drop_folder(cls, settings: Settings) -> StreamLimits:
        """Files of the S3 drop folder."""
        return cls(
            settings.inbox_max_decompressed_bytes,
            settings.inbox_max_gzip_ratio,
            "POSTROOM_INBOX_MAX_DECOMPRESSED_BYTES",
            "POSTROOM_INBOX_MAX_GZIP_RATIO",
        )


class LineStream:
    """Bytes as they arrive (gzip or not) → lines → `intake`, within `limits` (default: those of
    uploads) counted after decompression. Every byte stream of documents goes through one."""

    def __init__(
        self, intake: LineSink, *, gzip: bool, name: str, limits: StreamLimits | None = None
    ) -> None:
        settings = intake.settings
        limits = limits or StreamLimits.uploads(settings)
        self.intake = intake
        self.name = name
        self.max_bytes = limits.max_bytes
        self.limits = limits
        self.bytes = 0
        self.splitter = LineSplitter(settings.max_document_bytes)
        self.gunzip = (
            Gunzip(
                max_bytes=limits.max_bytes,
                max_ratio=limits.max_ratio,
                name=name,
                limits=(limits.bytes_setting, limits.ratio_setting),
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
                f"{self.name} is over {self.max_bytes:,} bytes ({self.limits.bytes_setting}); "
                "split it into smaller uploads",
                details=[{"field": "body", "reason": "size over the limit"}],
            )
        feed_lines(self.intake, self.splitter.feed(data))


def feed_lines(intake: LineSink, lines: list[bytes | None]) -> None:
    for line in lines:
        if line is None:
            intake.too_long_line()
        else:
            intake.add_line(line)


class Gunzip:
    """Decompress a (multi-member) gzip stream chunk by chunk, refusing bombs as they go off:
    more than `max_bytes` out (413), more than `max_ratio` times the bytes read once past
    GZIP_RATIO_FLOOR (413), or bytes that are not gzip (422). Holds at most one output chunk.
    The only gunzip: uploads, `input_uri` and the drop folder (which turns these errors into
    its reasons) all use it."""

    def __init__(
        self,
        *,
        max_bytes: int,
        max_ratio: int,
        name: str = "the upload",
        limits: tuple[str, str] = ("POSTROOM_MAX_UPLOAD_BYTES", "POSTROOM_MAX_GZIP_RATIO"),
    ) -> None:
        self.max_bytes = max_bytes
        self.max_ratio = max_ratio
        self.name = name
        self.limits = limits  # the settings behind max_bytes and max_ratio, named in errors
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
        bytes_setting, ratio_setting = self.limits
        if self.written > self.max_bytes:
            raise PayloadTooLarge(
                f"{self.name} decompresses to more than {self.max_bytes:,} bytes "
                f"({bytes_setting}); split it into smaller files",
                details=[{"field": "body", "reason": "decompressed size over the limit"}],
            )
        if self.written > GZIP_RATIO_FLOOR and self.written > self.max_ratio * self.read:
            raise PayloadTooLarge(
                f"{self.name} expands more than {self.max_ratio}x when decompressed "
                f"({ratio_setting}), like a gzip bomb; send it uncompressed or split it",
                details=[{"field": "body", "reason": "gzip ratio over the limit"}],
            )

    def stream(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        """Every chunk decompressed, then the end check: for a whole stream at once."""
        for chunk in chunks:
            yield from self.feed(chunk)
        self.end()
