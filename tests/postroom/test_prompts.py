"""Prompt layout and answer parsing with the generated tiny tokenizer (no engine)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from postroom.domain import Label
from postroom.prompts import (
    CALIBRATION_FLOOR,
    Layout,
    build_layout,
    calibration,
    first_token_collisions,
    parse_choice,
    parse_scores,
)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


def _labels(*names: str) -> list[Label]:
    return [Label(name=n) for n in names]


def test_prefix_first_layout_with_distinct_first_tokens(tokenizer: Any) -> None:
    layout = build_layout(
        tokenizer,
        labels=_labels("billing", "shipping", "login"),
        instructions="Classify.",
        doc_max_tokens=8,
        max_model_len=1024,
    )
    assert layout.markers is None
    assert len(set(layout.answer_ids)) == 3
    doc = tokenizer.encode(" invoice " * 20, add_special_tokens=False)
    prompt, truncated = layout.prompt(doc)
    assert truncated
    # the shared prefix comes first, the document after it, the cue last
    assert prompt[: len(layout.prefix_ids)] == list(layout.prefix_ids)
    assert prompt[-len(layout.suffix_ids) :] == list(layout.suffix_ids)
    assert len(prompt) == len(layout.prefix_ids) + 8 + len(layout.suffix_ids)


def test_colliding_first_tokens_switch_to_option_markers(tokenizer: Any) -> None:
    names = ("order late", "order lost", "refund")
    assert first_token_collisions(tokenizer, names) == [("order late", "order lost")]
    layout = build_layout(
        tokenizer,
        labels=_labels(*names),
        instructions="Classify.",
        doc_max_tokens=64,
        max_model_len=1024,
    )
    assert layout.markers == ("A", "B", "C")
    assert len(set(layout.answer_ids)) == 3
    text = tokenizer.decode(list(layout.prefix_ids))
    assert "A) order late" in text
    assert "C) refund" in text


@pytest.fixture
def two_labels(tokenizer: Any) -> Layout:
    """billing and shipping, a short budget: the layout the score tests read."""
    return build_layout(
        tokenizer,
        labels=_labels("billing", "shipping"),
        instructions="x",
        doc_max_tokens=8,
        max_model_len=1024,
    )


def test_scores_renormalise_over_the_label_set(two_labels: Layout) -> None:
    layout = two_labels
    a, b = layout.answer_ids
    result = parse_scores(layout, {a: -2.0, b: -0.5}, doc_id="d", tokens_in=10, truncated=False)
    assert result.label == "shipping"
    assert result.distribution is not None
    assert abs(sum(result.distribution.values()) - 1) < 1e-6
    assert result.confidence == result.distribution["shipping"]
    empty = parse_scores(layout, {}, doc_id="d", tokens_in=10, truncated=False)
    assert empty.label is None
    assert empty.error is not None


def test_choice_cut_off_or_outside_the_set_is_an_error_not_a_label() -> None:
    common: dict[str, Any] = {
        "doc_id": "d",
        "logprob_sum": -0.1,
        "tokens_in": 3,
        "truncated": False,
    }
    ok = parse_choice(["a", "b"], text="b", finish_reason="stop", tokens_out=1, **common)
    assert ok.label == "b"
    assert ok.error is None
    cut = parse_choice(["alpha", "b"], text="alp", finish_reason="length", tokens_out=16, **common)
    assert cut.label is None
    assert cut.error is not None
    assert "answer_cut_off" in cut.error
    odd = parse_choice(["a", "b"], text="c", finish_reason="stop", tokens_out=1, **common)
    assert odd.label is None
    assert odd.error is not None
    assert "answer_not_a_label" in odd.error


def test_calibration_divides_out_the_bias_of_content_free_answers(two_labels: Layout) -> None:
    layout = two_labels
    a, b = layout.answer_ids
    # With no evidence the model says "shipping" (0.9 of the mass): its bias.
    cal = calibration(layout, [{a: -2.3, b: -0.1}, {a: -2.3, b: -0.1}])
    assert cal == pytest.approx((0.0995, 0.9005), abs=1e-3)
    raw = parse_scores(layout, {a: -1.0, b: -0.5}, doc_id="d", tokens_in=10, truncated=False)
    assert raw.label == "shipping"
    calibrated = replace(layout, calibration=cal)
    result = parse_scores(calibrated, {a: -1.0, b: -0.5}, doc_id="d", tokens_in=10, truncated=False)
    assert result.label == "billing"
    assert result.distribution is not None
    assert sum(result.distribution.values()) == pytest.approx(1, abs=1e-5)
    # A label the content-free answers never gave is floored, not divided by zero.
    floored = calibration(layout, [{b: -0.1}])
    assert floored == (CALIBRATION_FLOOR, 1.0)
    assert calibration(layout, [{}]) == ()
