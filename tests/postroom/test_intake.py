"""Per-line validation and shard cutting (pure: no services)."""

from __future__ import annotations

import json
from typing import Any

from postroom.intake import IdSet, Intake
from postroom.jsonsafe import parse_json, show, text_problem
from postroom.lines import feed_lines
from postroom.settings import Settings


def make_intake(
    shard_size: int = 2, **overrides: Any
) -> tuple[Intake, list[tuple[int, list[Any]]]]:
    shards: list[tuple[int, list[Any]]] = []
    intake = Intake(
        settings=Settings(**overrides),
        sink=lambda n, d: shards.append((n, d)),
        shard_size=shard_size,
    )
    return intake, shards


def test_shards_fill_in_order_and_keep_line_numbers() -> None:
    intake, shards = make_intake(shard_size=2)
    for i in range(5):
        intake.add_line(json.dumps({"id": f"d{i}", "text": "t"}).encode())
    intake.finish()
    assert [n for n, _ in shards] == [0, 1, 2]
    assert [len(d) for _, d in shards] == [2, 2, 1]
    assert shards[2][1][0] == {"id": "d4", "text": "t", "line": 5}
    assert intake.shard_sizes == [2, 2, 1]


def test_every_bad_line_has_its_own_reason() -> None:
    intake, shards = make_intake(max_id_length=5)
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
    intake, _ = make_intake()
    intake.add_object({"id": "a", "text": "x", "lang": "en"})
    (rejected,) = intake.rejected
    assert rejected.field == "lang"
    assert "allowed: id, text, metadata" in rejected.reason


def test_json_that_cannot_be_stored_is_named_by_path() -> None:
    intake, shards = make_intake(max_metadata_depth=2)
    lines = [
        b'{"id": "a", "text": "x", "text": "y"}',
        b'{"id": "b", "text": "x", "metadata": {"k": {"z": 1, "z": 2}}}',
        b'{"id": "c", "text": "bad \\ud83d"}',
        b'{"id": "d\\u0000", "text": "x"}',
        b'{"id": "e", "text": "x", "metadata": {"s": Infinity}}',
        b'{"id": "f", "text": "x", "metadata": {"s": 1e400}}',
        b'{"id": "g", "text": "x", "metadata": {"a": {"b": {}}}}',
        b'{"id": "h", "text": "x", "metadata": {"a": {"b": 1}}}',
        b"[" * 3000 + b"]" * 3000,
    ]
    feed_lines(intake, list(lines))
    intake.finish()
    by_line = {r.line: r for r in intake.rejected}
    assert (by_line[1].field, "duplicate key 'text'") == ("text", by_line[1].reason[:20])
    assert by_line[2].field == "metadata.k"
    assert "duplicate key 'z'" in by_line[2].reason
    assert by_line[3].field == "text"
    assert "lone surrogate (\\ud83d at character 4)" in by_line[3].reason
    assert by_line[4].field == "id"
    assert "NUL" in by_line[4].reason
    assert by_line[4].id is None  # a bad id is never echoed (nor stored under skip)
    assert by_line[4].result_id == "line:4"
    assert "Infinity is not valid JSON" in by_line[5].reason
    assert "out of range" in by_line[6].reason
    assert by_line[7].field == "metadata.a.b"
    assert "POSTROOM_MAX_METADATA_DEPTH" in by_line[7].reason
    assert "nested too deeply" in by_line[9].reason
    assert [d["id"] for _, docs in shards for d in docs] == ["h"]


def test_inline_documents_get_the_byte_limit_and_hidden_duplicates() -> None:
    intake, shards = make_intake(max_document_bytes=100)
    intake.add_object({"id": "big", "text": "é" * 60})  # 120 bytes as UTF-8
    intake.add_object(parse_json(b'{"id": "dup", "text": "a", "text": "b"}'))
    intake.add_object(parse_json(b'{"id": "nan", "text": "a", "metadata": {"x": NaN}}'))
    intake.add_object({"id": "ok", "text": "fine"})
    intake.finish()
    reasons = {r.line: r.reason for r in intake.rejected}
    assert "POSTROOM_MAX_DOCUMENT_BYTES" in reasons[1]
    assert "duplicate key 'text'" in reasons[2]
    assert "NaN" in reasons[3]
    assert [d["id"] for _, docs in shards for d in docs] == ["ok"]


def test_show_makes_user_strings_safe_to_echo() -> None:
    assert show("a\x00b\ud800") == "a\\x00b\\ud800"
    assert show("x" * 50) == "x" * 40 + "…"
    assert text_problem("fine") is None


def test_id_set_grows_and_never_forgets() -> None:
    ids = IdSet(capacity=4)
    added = [ids.add(f"doc-{i}") for i in range(50_000)]
    assert all(added)
    assert len(ids) == 50_000
    assert "doc-0" in ids
    assert "doc-49999" in ids
    assert "doc-50000" not in ids
    assert not ids.add("doc-123")
    assert len(ids) == 50_000
    assert ids.add(
        "doc-\ud800"
    )  # a lone surrogate hashes instead of raising (it is rejected later)


def test_duplicate_ids_are_rejected_past_the_id_set_growth() -> None:
    intake, _shards = make_intake(shard_size=1000)
    for i in range(3000):
        intake.add_line(json.dumps({"id": i, "text": "t"}).encode())
    intake.add_line(json.dumps({"id": "7", "text": "again"}).encode())
    intake.finish()
    assert intake.accepted == 3000
    assert intake.details() == [
        {
            "line": 3001,
            "reason": "duplicate id; every document id in a job must be unique",
            "field": "id",
            "id": "7",
        }
    ]


def test_a_refused_job_keeps_only_the_rejected_lines_it_shows() -> None:
    intake, _ = make_intake(shard_size=10)
    intake.keep_rejected = 3
    for i in range(100):
        intake.add_line(b"not json" if i % 2 else json.dumps({"id": i, "text": "t"}).encode())
    assert intake.rejected_count == 50
    assert [r.line for r in intake.rejected] == [2, 4, 6]
