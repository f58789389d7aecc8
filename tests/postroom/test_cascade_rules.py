"""The cascade's pure rules: which documents a shard escalates under the caps, and how
`postroom eval --cascade` replays thresholds from both answers."""

from __future__ import annotations

from typing import Any

import pytest

from postroom.domain import Cascade, DocResult
from postroom_cli.cascade_eval import Answers, answers_of, default_thresholds, sweep
from worker.cascade import choose


def _shard(confidences: list[float | None]) -> tuple[list[DocResult], list[dict[str, Any]]]:
    results = [
        DocResult(id=f"d{i}", label="a", confidence=c)
        if c is not None
        else DocResult(id=f"d{i}", error="too_long")
        for i, c in enumerate(confidences)
    ]
    return results, [{"id": r.id, "text": "x"} for r in results]


def test_the_least_confident_under_the_threshold_up_to_the_share() -> None:
    results, docs = _shard([0.95, 0.2, 0.6, None, 0.5, 0.89, 0.2, 0.9, 0.1, 0.7])
    cascade = Cascade(below=0.9, route="spill", model="m", max_share=0.4)
    chosen, capped = choose(results, docs, cascade=cascade, costs=[1.0] * 10, budget=None)
    # under 0.9: d8 0.1, d1 0.2, d6 0.2, d4 0.5, d2 0.6, d9 0.7, d5 0.89 (not the error, not 0.9)
    assert chosen == [8, 1, 6, 4]  # floor(0.4 x 10); ties by position
    assert capped == 3


def test_the_budget_stops_before_it_is_exceeded() -> None:
    results, docs = _shard([0.1, 0.2, 0.3, 0.4])
    cascade = Cascade(below=1.0, route="spill", model="m")
    costs = [0.4, 0.4, 0.4, 0.1]
    chosen, capped = choose(results, docs, cascade=cascade, costs=costs, budget=1.0)
    assert chosen == [0, 1]  # the third (0.4 more) would make 1.2; cheaper ones wait their turn
    assert capped == 2
    assert choose(results, docs, cascade=cascade, costs=costs, budget=0.0) == ([], 4)


def test_answers_from_result_lines() -> None:
    lines = [
        {"id": "1", "label": "b", "confidence": 0.9, "first": {"label": "a", "confidence": 0.3}},
        {"id": "2", "label": "a", "confidence": 0.4, "escalation_error": "escalation_failed"},
        {"id": "3", "label": None, "confidence": None, "error": "too_long"},
        {"id": "x", "label": "a", "confidence": 0.5},  # not in the labelled file
    ]
    truth = {"1": "b", "2": "b", "3": "a"}
    assert answers_of(lines, truth) == [
        Answers("b", "a", 0.3, "b"),
        Answers("b", "a", 0.4, None),
        Answers("a", None, None, None),
    ]


def test_sweep_replays_each_threshold() -> None:
    answers = [
        Answers("a", "a", 0.9, "a"),
        Answers("a", "b", 0.3, "a"),
        Answers("b", "a", 0.5, "b"),
        Answers("b", "a", 0.2, None),  # its escalation failed: the first answer at any threshold
    ]
    points = sweep(answers, [0.0, 0.4, 0.6, 1.0], first_cost=0.5, frontier_cost_per_doc=0.25)
    assert [p.escalated for p in points] == [0, 1, 2, 3]
    assert [p.accuracy for p in points] == [0.25, 0.5, 0.75, 0.75]
    assert [p.cost for p in points] == [0.5, 0.75, 1.0, 1.25]
    assert points[-1].per_1000_docs == pytest.approx(1.25 / 4 * 1000)


def test_default_thresholds_add_the_deciles_of_the_confidences() -> None:
    answers = [Answers("a", "a", 0.30 + i / 1000, None) for i in range(100)]
    thresholds = default_thresholds(answers)
    assert thresholds == sorted(thresholds)
    assert {0.0, 0.5, 1.0} <= set(thresholds)
    # nine points inside 0.30-0.40, where every confidence lies
    assert [t for t in thresholds if 0.3 < t < 0.4] == [round(0.31 + k / 100, 3) for k in range(9)]
