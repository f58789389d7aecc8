"""Fuzzing: the upload parser (hypothesis: arbitrary bytes never raise, every rejected line has a
reason, accepted + rejected + blank = lines) and the JSON API (schemathesis against the running
API's /openapi.json with a valid key: no 5xx, no response outside the schema, and every 4xx in
the one error body)."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from postroom.intake import Intake
from postroom.lines import LineSplitter, LineStream, feed_lines
from postroom.settings import Settings

SETTINGS = Settings(max_document_bytes=300, max_id_length=8, max_metadata_depth=3)

# -- the upload parser


def _run(chunks: list[bytes], *, gzip: bool = False) -> tuple[Intake, list[dict[str, Any]]]:
    accepted: list[dict[str, Any]] = []
    intake = Intake(settings=SETTINGS, sink=lambda _n, docs: accepted.extend(docs), shard_size=3)
    stream = LineStream(intake, gzip=gzip, name="the upload")
    for chunk in chunks:
        stream.feed(chunk)
    stream.end()
    intake.finish()
    return intake, accepted


def _lines(data: bytes) -> list[bytes]:
    """The lines a JSONL reader sees: split on \\n, with a last line that has no newline."""
    lines = data.split(b"\n")
    return lines[:-1] if lines and lines[-1] == b"" else lines


def _check_invariants(data: bytes, intake: Intake, accepted: list[dict[str, Any]]) -> None:
    lines = _lines(data)
    blank = sum(1 for line in lines if not line.rstrip(b"\r").strip())
    assert intake.lines == len(lines)
    assert intake.accepted + intake.rejected_count + blank == len(lines)
    assert len(accepted) == intake.accepted
    assert len(intake.rejected) == intake.rejected_count
    for rejected in intake.rejected:
        assert rejected.reason
        assert 1 <= rejected.line <= len(lines)
        # Everything an error carries can be sent as JSON and stored in Postgres.
        json.dumps(rejected.detail(), ensure_ascii=False).encode()
        assert "\x00" not in json.dumps(rejected.detail(), ensure_ascii=False)
    ids = [doc["id"] for doc in accepted] + [r.result_id for r in intake.rejected]
    assert len(ids) == len(set(ids)), "result ids collide"
    for doc in accepted:
        assert isinstance(doc["text"], str)
        assert doc["text"].strip()
        json.dumps(doc, ensure_ascii=False, allow_nan=False).encode()


def _chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
documents = st.fixed_dictionaries(
    {},
    optional={
        "id": st.text(max_size=10) | st.integers() | json_values,
        "text": st.text(max_size=40) | json_values,
        "metadata": json_values,
        "extra": json_values,
    },
)
json_lines = st.lists(
    st.one_of(
        documents.map(lambda d: json.dumps(d).encode()),
        json_values.map(lambda v: json.dumps(v).encode()),
        st.binary(max_size=40),
        st.sampled_from(
            [b"", b"   ", b"\r", b"{", b"NaN", b'{"text": "a", "text": "b"}', b'"\\ud800"']
        ),
    ),
    max_size=12,
)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=2000), cuts=st.lists(st.integers(0, 2000), max_size=6))
def test_arbitrary_bytes_never_raise(data: bytes, cuts: list[int]) -> None:
    intake, accepted = _run(_chunked(data, cuts))
    _check_invariants(data, intake, accepted)


@settings(max_examples=300, deadline=None)
@given(lines=json_lines, cuts=st.lists(st.integers(0, 3000), max_size=6))
def test_jsonish_lines_are_accepted_or_rejected_with_a_reason(
    lines: list[bytes], cuts: list[int]
) -> None:
    data = b"\n".join(line.replace(b"\n", b" ") for line in lines)
    intake, accepted = _run(_chunked(data, cuts))
    _check_invariants(data, intake, accepted)


@settings(max_examples=100, deadline=None)
@given(lines=json_lines, cuts=st.lists(st.integers(0, 3000), max_size=4))
def test_gzip_gives_the_same_answer_as_plain(lines: list[bytes], cuts: list[int]) -> None:
    import gzip

    data = b"\n".join(line.replace(b"\n", b" ") for line in lines)
    plain, plain_docs = _run([data])
    packed, packed_docs = _run(_chunked(gzip.compress(data), cuts), gzip=True)
    assert packed_docs == plain_docs
    assert packed.details() == plain.details()


def test_splitter_never_holds_more_than_a_line() -> None:
    splitter = LineSplitter(max_bytes=10)
    assert splitter.feed(b"x" * 1000) == [None]
    assert splitter.feed(b"y" * 1000) == []
    assert splitter.feed(b"z\nok\n") == [b"ok"]
    intake = Intake(settings=SETTINGS, sink=lambda _n, _d: None, shard_size=3)
    feed_lines(intake, [None])
    assert intake.rejected_count == 1


# -- the JSON API, through its own OpenAPI schema

# Per operation and generation mode (positive: fits the schema; negative: does not), so the run
# stays around a minute or two.
MAX_EXAMPLES = 60
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


def _error_body(response: Any) -> None:
    if 400 <= response.status_code < 500:
        body = response.json()
        error = body.get("error") if isinstance(body, dict) else None
        assert isinstance(error, dict), response.text
        assert isinstance(error.get("code"), str), response.text
        assert error["code"], response.text
        assert isinstance(error.get("message"), str), response.text
        assert error["message"], response.text
        assert isinstance(error.get("details"), list), response.text


def _fuzz(
    operation: Any, mode: GenerationMode, *, api_url: str, key: str, seen: Counter[str]
) -> None:
    """One hypothesis run over one operation in one generation mode."""

    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        headers = {"Authorization": f"Bearer {key}"}
        response = case.call(base_url=api_url, headers=headers, timeout=30)
        seen[operation.label] += 1
        seen[f"status {response.status_code}"] += 1
        case.validate_response(response, checks=CHECKS)
        _error_body(response)

    run()


def test_api_never_5xx_and_every_error_has_the_error_body(api_url: str, tenant_key: str) -> None:
    """Every operation of /openapi.json, positive and negative cases, with a valid key.

    (schemathesis's pytest plugin cannot load a schema from a fixture under pytest 9, so the
    operations are driven here, one hypothesis run each.)"""
    schema = schemathesis.openapi.from_url(f"{api_url}/openapi.json")
    seen: Counter[str] = Counter()
    failures: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                _fuzz(operation, mode, api_url=api_url, key=tenant_key, seen=seen)
            except Unsatisfiable:
                pass  # nothing in this operation can be made invalid (no parameters, no body)
            except (Exception, BaseExceptionGroup) as e:  # collect them all, then fail once
                failures.append(f"{operation.label} [{mode}]: {e}"[:3000])
    statuses = {k: v for k, v in sorted(seen.items()) if k.startswith("status ")}
    operations = len(seen) - len(statuses)
    print(  # noqa: T201
        f"\nschemathesis: {sum(seen.values()) // 2} generated cases over {operations} "
        f"operations; {statuses}"
    )
    assert not failures, "\n\n".join(failures)
