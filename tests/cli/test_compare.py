"""The arithmetic of `postroom eval --compare` (no engine): sides, calibration error, agreement
and the gate, on runs whose answers are known."""

from __future__ import annotations

import pytest

from postroom_cli.compare import agreement, compare, parse_compare, reliability
from postroom_cli.evaluate import EvalRun

LABELS = ["a", "b"]


def make_run(answers: list[tuple[str | None, float | None]], truth: list[str]) -> EvalRun:
    ids = [f"d{i}" for i in range(len(truth))]
    job = {"id": "j", "model": "m", "revision": "r"}
    return EvalRun(
        LABELS, dict(zip(ids, truth, strict=True)), dict(zip(ids, answers, strict=True)), job, 2.0
    )


def test_sides_take_an_alias_and_job_parameters_only() -> None:
    a, b = parse_compare("tiny,tiny?decoding=choice&spill=never")
    assert (a.model, a.params) == ("tiny", {})
    assert b.job_params() == {"model": "tiny", "decoding": "choice", "spill": "never"}
    with pytest.raises(ValueError, match="register a second one"):
        parse_compare("tiny,tiny?max_model_len=64")
    with pytest.raises(ValueError, match="two sides"):
        parse_compare("tiny")


def test_calibration_error_is_the_weighted_gap_between_confidence_and_accuracy() -> None:
    # Bin 0.9-1.0: two answers at 0.95, one right (accuracy 0.5, gap 0.45); bin 0.6-0.7: two at
    # 0.65, both right (gap 0.35). A failed document is left out.
    run = make_run(
        [("a", 0.95), ("b", 0.95), ("a", 0.65), ("b", 0.65), (None, None)],
        ["a", "a", "a", "b", "a"],
    )
    ece, bins = reliability(run)
    assert ece == pytest.approx((2 * 0.45 + 2 * 0.35) / 4)
    assert [(b["low"], b["count"], b["accuracy"]) for b in bins] == [(0.6, 2, 1.0), (0.9, 2, 0.5)]


def test_the_gate_fails_only_past_max_drop_and_reports_agreement() -> None:
    truth = ["a", "a", "b", "b"]
    good = make_run([("a", 0.9), ("a", 0.9), ("b", 0.9), ("b", 0.9)], truth)
    worse = make_run([("a", 0.9), ("b", 0.9), ("b", 0.9), ("b", 0.9)], truth)
    sides = parse_compare("x,y")
    assert agreement(good, worse) == 0.75
    failed = compare(sides, (good, worse), max_drop=20)
    assert failed["delta"]["accuracy_points"] == -25.0
    assert not failed["passed"]
    assert failed["failures"][0].startswith("accuracy drops 25.00 points")
    assert compare(sides, (good, worse), max_drop=40)["passed"]
    assert compare(sides, (worse, good), max_drop=0)["passed"]  # B better than A
    assert compare(sides, (good, worse), max_drop=None)["passed"]
