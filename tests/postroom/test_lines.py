"""Bytes to lines: the splitter, the one gunzip, the size-limited stream (pure: no services)."""

from __future__ import annotations

import gzip

import pytest

from postroom.errors import InvalidInput, PayloadTooLarge
from postroom.lines import Gunzip, LineSplitter, LineStream
from tests.postroom.test_intake import make_intake


def test_splitter_joins_chunks_and_flags_overlong_lines_once() -> None:
    splitter = LineSplitter(max_bytes=10)
    out = splitter.feed(b'{"a"') + splitter.feed(b":1}\nshort\r\n" + b"x" * 25)
    out += splitter.feed(b"y" * 5 + b"\nlast")
    out += splitter.end()
    assert out == [b'{"a":1}', b"short", None, b"last"]


def test_gunzip_streams_members_and_refuses_bombs_and_garbage() -> None:
    data = b'{"id": "a", "text": "x"}\n' * 1000
    packed = gzip.compress(data[:500]) + gzip.compress(data[500:])
    unzip = Gunzip(max_bytes=10**6, max_ratio=100)
    out = b"".join(part for i in range(0, len(packed), 7) for part in unzip.feed(packed[i : i + 7]))
    unzip.end()
    assert out == data
    bomb = gzip.compress(b"\n" * 10_000_000)
    with pytest.raises(PayloadTooLarge, match="POSTROOM_MAX_GZIP_RATIO"):
        list(Gunzip(max_bytes=10**9, max_ratio=100).feed(bomb))
    with pytest.raises(PayloadTooLarge, match="POSTROOM_MAX_UPLOAD_BYTES"):
        list(Gunzip(max_bytes=1000, max_ratio=10**6).feed(gzip.compress(data)))
    with pytest.raises(InvalidInput, match="not valid gzip"):
        list(Gunzip(max_bytes=1000, max_ratio=100).feed(b"plain text"))
    cut = Gunzip(max_bytes=10**6, max_ratio=100)
    list(cut.feed(gzip.compress(data)[:-10]))
    with pytest.raises(InvalidInput, match="truncated"):
        cut.end()


@pytest.mark.parametrize("chunk", [1, 1000, 1 << 20])
def test_gunzip_streams_multi_member_files_in_any_chunking(chunk: int) -> None:
    members = [b"a\n" * 900_000, b"", b'{"text":"b"}\n' * 3]  # the first fills output chunks
    blob = b"".join(gzip.compress(m) for m in members)
    pieces = [blob[i : i + chunk] for i in range(0, len(blob), chunk)]
    unzip = Gunzip(max_bytes=10**9, max_ratio=10**6, name="f.jsonl.gz")
    assert b"".join(unzip.stream(pieces)) == b"".join(members)
    with pytest.raises(InvalidInput, match="truncated"):
        list(Gunzip(max_bytes=10**9, max_ratio=10**6).stream([blob[:-9]]))


def test_gunzip_names_the_settings_it_was_given() -> None:
    limits = ("POSTROOM_INBOX_MAX_DECOMPRESSED_BYTES", "POSTROOM_INBOX_MAX_GZIP_RATIO")
    small = Gunzip(max_bytes=1000, max_ratio=10**6, name="big.jsonl.gz", limits=limits)
    with pytest.raises(PayloadTooLarge, match=r"big\.jsonl\.gz decompresses .*INBOX_MAX_DECOMP"):
        list(small.stream([gzip.compress(b"x" * 5000)]))
    bomb = Gunzip(max_bytes=10**9, max_ratio=100, limits=limits)
    with pytest.raises(PayloadTooLarge, match="POSTROOM_INBOX_MAX_GZIP_RATIO"):
        list(bomb.stream([gzip.compress(b"\n" * 10_000_000)]))


def test_line_stream_holds_uploads_to_the_size_limit_after_decompression() -> None:
    body = b'{"text": "x"}\n' * 100  # 1,400 bytes
    intake, _ = make_intake(max_upload_bytes=1000)
    stream = LineStream(intake, gzip=True, name="upload.jsonl.gz")
    with pytest.raises(PayloadTooLarge, match=r"upload\.jsonl\.gz decompresses to more than 1,000"):
        stream.feed(gzip.compress(body))
    intake, _ = make_intake(max_upload_bytes=1000)
    stream = LineStream(intake, gzip=False, name="the request body")
    stream.feed(body[:900])
    with pytest.raises(PayloadTooLarge, match=r"the request body is over 1,000 bytes"):
        stream.feed(body[900:])
