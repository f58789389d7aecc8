"""Accuracy on real labelled data (the shipped samples of tweets and movie reviews), per model and
way of giving the labels: the worker's own classifier on a real engine, shard by shard.

Rows per dataset and model alias:

* ``bare names``: cosine to each label name's vector, nothing else (embedding mode before
  templates, examples and centering; the baseline the README compares with);
* ``names``: label names only, as a job sends them, with the deployment's defaults
  (``POSTROOM_EMBEDDING_LABEL_TEMPLATE``, centering); ``names + template T`` when ``--template``
  gives a job-level template;
* ``5-shot``: the same names, each with the 5 held-out examples of ``NAME.5shot.labels.json``;
* generative aliases: ``names`` and ``5-shot`` again with contextual calibration (the model's
  ``calibrate``: label probabilities divided by its answers to content-free documents).

    .venv/bin/python bench/label_quality.py                       # minilm, both datasets
    .venv/bin/python bench/label_quality.py --models minilm,smollm2 --limit 300

Prints a table and writes bench/results/label_quality.json.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

from report import bench_parser, parse_bench_args, print_table, write_results

DATA = Path(__file__).resolve().parents[1] / "postroom" / "data"
DATASETS = ("movie_reviews", "tweets")
TEMPLATES = {"tweets": "A {name} tweet.", "movie_reviews": "A {name}."}


def load(name: str, limit: int | None) -> tuple[list[dict[str, Any]], list[str], list[Any]]:
    docs = [json.loads(line) for line in (DATA / f"{name}.jsonl").read_text().splitlines()]
    names = json.loads((DATA / f"{name}.labels.json").read_text())
    shots = json.loads((DATA / f"{name}.5shot.labels.json").read_text())
    return docs[:limit] if limit else docs, names, shots


def accuracy(results: list[Any], docs: list[dict[str, Any]]) -> float:
    right = sum(r.label == d["label"] for r, d in zip(results, docs, strict=True))
    return right / len(docs)


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--models", default="minilm", help="aliases in POSTROOM_MODELS")
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--limit", type=int, default=None, help="first N documents of each")
    args = parse_bench_args(parser, "label_quality")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from postroom.domain import DEFAULT_INSTRUCTIONS, JobSpec, Label
    from postroom.settings import get_settings
    from worker.classifier import EngineClassifier
    from worker.engine import EngineAdapter
    from worker.loop import LoopThread
    from worker.runtime import prepare_models

    settings = get_settings()
    loop = LoopThread()
    rows: list[dict[str, Any]] = []
    prepare_models(settings, args.models.split(","))  # smollm2: its checkpoint from the GGUF
    for alias in args.models.split(","):
        spec = settings.models[alias]
        engine = EngineAdapter(
            alias=alias, spec=spec, path=settings.model_path(alias), settings=settings
        )
        loop.run(engine.start(), timeout=900)
        try:

            def classify(
                labels: list[Label],
                template: str | None,
                docs: list[dict[str, Any]],
                center: int,
                calibrate: bool,
            ) -> tuple[float, float]:
                engine.spec = spec.model_copy(update={"calibrate": calibrate})  # noqa: B023
                classifier = EngineClassifier(
                    loop=loop,
                    engines={alias: engine},  # noqa: B023 - called within this iteration only
                    doc_max_tokens=settings.doc_max_tokens,
                    choice_max_tokens=settings.choice_max_tokens,
                    embedding_temperature=settings.embedding_temperature,
                    timeout=3600,
                    embedding_center_min_docs=center,
                    embedding_label_weight=settings.embedding_label_weight,
                )
                job = JobSpec(
                    labels=labels,
                    instructions=DEFAULT_INSTRUCTIONS,
                    mode=spec.mode,  # noqa: B023
                    model=alias,  # noqa: B023
                    revision=spec.revision,  # noqa: B023
                    label_template=template,
                )
                started, job_id, results = time.monotonic(), uuid.uuid4(), []
                size = settings.shard_size
                for n in range(0, len(docs), size):
                    results += classifier.classify(
                        job_id=job_id, spec=job, shard=f"q/{n}", docs=docs[n : n + size]
                    )
                return accuracy(results, docs), len(docs) / (time.monotonic() - started)

            for name in args.datasets.split(","):
                docs, names, shots = load(name, args.limit)
                bare = [Label(name=n) for n in names]
                few = [Label(**s) for s in shots]
                default = settings.embedding_label_template
                center = settings.embedding_center_min_docs
                ways: list[tuple[str, list[Label], str | None, int, bool]] = [
                    ("names", bare, default, center, spec.calibrate),
                    ("5-shot", few, default, center, spec.calibrate),
                ]
                if spec.mode == "embedding":
                    ways.insert(0, ("bare names", bare, None, 0, False))
                    ways.insert(
                        2,
                        (
                            f"names + template {TEMPLATES[name]!r}",
                            bare,
                            TEMPLATES[name],
                            center,
                            False,
                        ),
                    )
                elif not spec.calibrate:  # generative: with contextual calibration too
                    ways += [
                        ("names, calibrated", bare, default, center, True),
                        ("5-shot, calibrated", few, default, center, True),
                    ]
                for way, labels, template, center, calibrate in ways:
                    acc, rate = classify(labels, template, docs, center, calibrate)
                    rows.append(
                        {
                            "dataset": name,
                            "docs": len(docs),
                            "model": alias,
                            "mode": spec.mode,
                            "labels": way,
                            "accuracy": round(acc, 3),
                            "docs_per_s": round(rate, 1),
                        }
                    )
                    print(f"  {name} {alias} {way}: {acc:.3f}", flush=True)
        finally:
            engine.shutdown()
    loop.stop()
    print_table(
        f"{'dataset':<14} {'docs':>5} {'model':<8} {'labels':<40} {'accuracy':>8}",
        (
            f"{r['dataset']:<14} {r['docs']:>5} {r['model']:<8} {r['labels']:<40} "
            f"{r['accuracy']:>8.3f}"
            for r in rows
        ),
    )
    write_results(args.out, {"results": rows})


if __name__ == "__main__":
    main()
