"""Line splitting and per-line validation (pure: no services)."""

from __future__ import annotations

import json
from typing import Any

from postroom.intake import Intake, LineSplitter, feed_lines
from postroom.settings import Settings


def _intake(shard_size: int = 2, **overrides: Any) -> tuple[Intake, list[tuple[int, list[Any]]]]:
    shards: list[tuple[int, list[Any]]] = []
    intake = Intake(
        settings=Settings(**overrides),
        sink=lambda n, d: shards.append((n, d)),
        shard_size=shard_size,
    )
    return intake, shards


def test_splitter_joins_chunks_and_flags_overlong_lines_once() -> None:
    splitter = LineSplitter(max_bytes=10)
    out = splitter.feed(b'{"a"') + splitter.feed(b":1}\nshort\r\n" + b"x" * 25)
    out += splitter.feed(b"y" * 5 + b"\nlast")
    out += splitter.end()
    assert out == [b'{"a":1}', b"short", None, b"last"]


def test_shards_fill_in_order_and_keep_line_numbers() -> None:
    intake, shards = _intake(shard_size=2)
    for i in range(5):
        intake.add_line(json.dumps({"id": f"d{i}", "text": "t"}).encode())
    intake.finish()
    assert [n for n, _ in shards] == [0, 1, 2]
    assert [len(d) for _, d in shards] == [2, 2, 1]
    assert shards[2][1][0] == {"id": "d4", "text": "t", "line": 5}
    assert intake.shard_sizes == [2, 2, 1]


def test_every_bad_line_has_its_own_reason() -> None:
    intake, shards = _intake(max_id_length=5)
    lines = [
        b"[1, 2]",
        b'{"id": "ok", "text": "fine"}',
        b'{"id": "ok", "text": "again"}',
        b'{"id": "toolongid", "text": "x"}',
        b'{"id": "n", "text": "NaN", "score": NaN}',
        b'{"id": true, "text": "x"}',
        b'{"id": "m", "text": "x", "metadata": [1]}',
        b'{"id": "z", "text": "nul\\u0000"}',
        b"",
        b'{"text": "no id uses the line number"}',
    ]
    feed_lines(intake, [*lines, None])
    intake.finish()
    reasons = {r.line: r.reason for r in intake.rejected}
    assert "expected a JSON object" in reasons[1]
    assert "duplicate id" in reasons[3]
    assert "POSTROOM_MAX_ID_LENGTH" in reasons[4]
    assert "NaN is not valid JSON" in reasons[5]
    assert "string or an integer" in reasons[6]
    assert "metadata" in reasons[7] or "JSON object" in reasons[7]
    assert "NUL" in reasons[8]
    assert "POSTROOM_MAX_DOCUMENT_BYTES" in reasons[11]
    assert 9 not in reasons  # blank lines are skipped, not errors
    accepted = [doc for _, docs in shards for doc in docs]
    assert [d["id"] for d in accepted] == ["ok", "10"]
    # Rejected lines get deterministic result ids that never collide with accepted ones
    result_ids = [r.result_id for r in intake.rejected]
    assert len(set(result_ids)) == len(result_ids)
    assert "ok" not in result_ids


def test_unknown_fields_are_named() -> None:
    intake, _ = _intake()
    intake.add_object({"id": "a", "text": "x", "lang": "en"})
    (rejected,) = intake.rejected
    assert rejected.field == "lang"
    assert "allowed: id, text, metadata" in rejected.reason
