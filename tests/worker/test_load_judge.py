"""How bench/load.py judges a load level's deadlines: against what routing with perfect knowledge
could have done with the same arrivals (a fluid model of both routes)."""

from __future__ import annotations

import importlib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture
def load(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """bench/ is no installed package and its scripts import their siblings by name."""
    monkeypatch.syspath_prepend(str(BENCH))
    return importlib.import_module("load")


# (arrival s, due s, docs) against a GPU of 100 docs/s and spill of 50 docs/s:
# A fits on the GPU (done at 5 s); B keeps 600 there (5-11 s) and needs 200 spilled (done at 5 s);
# C, due at 3 s behind 11 s of GPU work, needs all 1,000 spilled: 20 s, infeasible, set aside;
# D keeps 300 on the GPU behind B (11-14 s) and needs 100 spilled (5-7 s).
JOBS = [(0.0, 10.0, 500), (1.0, 11.0, 800), (2.0, 3.0, 1000), (4.0, 14.0, 400)]


def test_ideal_split_keeps_on_the_gpu_what_it_finishes_in_time_and_spills_the_rest(
    load: ModuleType,
) -> None:
    ideal = load.ideal_split(JOBS, gpu_rate=100.0, spill_rate=50.0)
    assert ideal == {"feasible": [True, True, False, True], "spill_needed_docs": 300}
    # A spill route twice as fast cannot save C (1,000 documents due 1 s after they arrive); a
    # GPU fast enough for everything needs nothing spilled.
    assert load.ideal_split(JOBS, gpu_rate=100.0, spill_rate=100.0)["feasible"] == [
        True,
        True,
        False,
        True,
    ]
    assert load.ideal_split(JOBS, gpu_rate=1000.0, spill_rate=50.0) == {
        "feasible": [True, True, True, True],
        "spill_needed_docs": 0,
    }


def test_misses_are_counted_against_the_feasible_jobs_only(load: ModuleType) -> None:
    t0 = datetime(2026, 12, 4, tzinfo=UTC)

    def job(arrival: float, due: float, docs: int, finished: float) -> dict[str, Any]:
        at = [(t0 + timedelta(seconds=s)).isoformat() for s in (arrival, due, finished)]
        return {
            "created_at": at[0],
            "deadline": at[1],
            "finished_at": at[2],
            "counts": {"total": docs},
        }

    # B (feasible) and C (infeasible) missed; given out of arrival order
    results = [
        job(*JOBS[3], finished=13.0),
        job(*JOBS[1], finished=12.0),
        job(*JOBS[0], finished=6.0),
        job(*JOBS[2], finished=30.0),
    ]
    judged = load.judge_deadlines(results, gpu_rate=100.0, spill_rate=50.0)
    assert judged["feasible_jobs"] == 3
    assert judged["feasible_misses"] == 1
    assert judged["spill_needed_share"] == pytest.approx(300 / 2700, abs=1e-3)
