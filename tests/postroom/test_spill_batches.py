"""Patient spill's pure parts (postroom.spill_batches): when a job may wait for a batch, and how a
batch's output and error lines become one result per document."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from postroom.domain import JobSpec, Label
from postroom.settings import Settings
from postroom.spill_batches import is_patient, read_output, request_lines, window_seconds

NOW = datetime(2026, 12, 4, tzinfo=UTC)
LABELS = ["billing", "shipping"]
DOCS = [{"id": "a", "text": "refund"}, {"id": "b", "text": "late"}, {"id": "c", "text": "x"}]


def _output(custom_id: str, content: str, *, logprob: float = -0.1) -> dict[str, Any]:
    body = {
        "choices": [
            {
                "message": {"content": content},
                "logprobs": {"content": [{"token": "t", "logprob": logprob}]},
            }
        ],
        "usage": {"prompt_tokens": 40, "completion_tokens": 3},
    }
    return {"custom_id": custom_id, "response": {"status_code": 200, "body": body}}


def test_a_job_is_patient_only_past_the_completion_window() -> None:
    settings = Settings(spill_base_url="http://127.0.0.1:9/v1", spill_batch_completion_window="24h")
    assert window_seconds("24h") == 86_400
    assert is_patient(settings, NOW + timedelta(hours=48), NOW)
    assert not is_patient(settings, NOW + timedelta(hours=23), NOW)
    assert not is_patient(settings, None, NOW)
    assert not is_patient(Settings(spill_batch_enabled=False), NOW + timedelta(hours=48), NOW)
    with pytest.raises(ValueError, match="completion window"):
        window_seconds("soon")


def test_output_lines_become_one_result_per_document_in_order() -> None:
    outputs = [_output("b", json.dumps({"label": "shipping"})), _output("a", '"billing"')]
    errors = [{"custom_id": "c", "error": {"code": "batch_expired", "message": "too late"}}]

    results = read_output(DOCS, LABELS, outputs, errors)

    assert [r.id for r in results] == ["a", "b", "c"]
    assert [r.label for r in results] == ["billing", "shipping", None]
    assert results[0].confidence == pytest.approx(0.904837, abs=1e-6)
    assert results[0].tokens_in == 40
    assert results[2].error == "batch_request_failed: batch_expired: too late"


def test_an_answer_outside_the_labels_or_a_missing_line_fails_the_document() -> None:
    results = read_output(DOCS[:2], LABELS, [_output("a", '{"label": "refunds"}')], [])

    assert results[0].label is None
    assert results[0].error is not None
    assert results[0].error.startswith("answer_not_a_label")
    assert results[1].error is not None
    assert results[1].error.startswith("batch_request_missing")


def test_request_lines_carry_the_document_ids_and_the_label_schema() -> None:
    spec = JobSpec(
        labels=[Label(name="billing"), Label(name="shipping")],
        instructions="Classify the ticket.",
        mode="generative",
        model="tiny",
        revision="r",
    )
    lines = [json.loads(x) for x in request_lines(Settings(), spec, DOCS).splitlines()]

    assert [line["custom_id"] for line in lines] == ["a", "b", "c"]
    assert {line["url"] for line in lines} == {"/v1/chat/completions"}
    schema = lines[0]["body"]["response_format"]["json_schema"]["schema"]
    assert schema["properties"]["label"]["enum"] == LABELS
    assert lines[1]["body"]["messages"][-1] == {"role": "user", "content": "late"}
