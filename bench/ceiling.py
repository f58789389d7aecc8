"""The pipeline's ceiling: documents through upload → API → S3 → Redis → worker → S3 + Postgres with
a null classifier (labels from a hash, no model), and where the time goes.

    .venv/bin/python bench/ceiling.py                 # 100,000 docs
    .venv/bin/python bench/ceiling.py --docs 20000 --concurrency 16

The profile comes from the worker's per-shard phase timings (claim, read, classify, commit, write)
summed over shards, and the upload's share of the wall time. Prints a table, writes
bench/results/ceiling.json.
"""

from __future__ import annotations

import json
import random
import re
import time
from pathlib import Path

from report import bench_parser, parse_bench_args, print_table, scratch_dir, write_results
from stack import Stack, bench_settings

PHASES = ("claim", "read", "classify", "commit", "write")


def write_docs(path: Path, count: int, *, seed: int = 7) -> None:
    from worker.tiny_model import WORDS

    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(count):
            text = " ".join(rng.choices(WORDS, k=rng.randint(20, 120)))
            f.write(json.dumps({"id": f"c{i:08d}", "text": text}) + "\n")


def phase_totals(log: Path) -> dict[str, float]:
    totals = dict.fromkeys(PHASES, 0.0)
    pattern = re.compile(r"(claim|read|classify|commit|write)=([0-9.]+)")
    for line in log.read_text(errors="replace").splitlines():
        if "shard done" in line:
            for name, value in pattern.findall(line):
                totals[name] += float(value)
    return totals


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--docs", type=int, default=100_000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--shard-size", type=int, default=256)
    args = parse_bench_args(parser, "ceiling")
    logs = scratch_dir("ceiling")
    path = logs / "docs.jsonl"
    write_docs(path, args.docs)
    settings = bench_settings(worker_null_classifier=True, shard_size=args.shard_size)
    workers = [["worker", "--concurrency", str(args.concurrency)]]
    with Stack(settings, logs, workers=workers) as stack:
        stack.run_job(path, args.docs)  # warm-up pass: connections, imports, caches
        for log in logs.glob("worker*.log"):
            log.write_text("")
        run = stack.run_job(path, args.docs)
        time.sleep(0.5)  # let the last log lines land (bench only; not a test)
        phases = phase_totals(logs / "worker0.log")
    busy = sum(phases.values())
    row = {
        "docs": args.docs,
        "seconds": round(run["seconds"], 2),
        "docs_per_s": round(run["docs_per_s"], 1),
        "upload_s": round(run["upload_s"], 2),
        "upload_docs_per_s": round(args.docs / run["upload_s"], 1),
        "worker_concurrency": args.concurrency,
        "phase_seconds": {k: round(v, 2) for k, v in phases.items()},
        "phase_share": {k: round(v / busy, 3) if busy else 0.0 for k, v in phases.items()},
    }
    print_table(
        f"{'docs':>8} {'seconds':>8} {'docs/s':>9} {'upload s':>9} {'upload docs/s':>14}",
        [
            f"{row['docs']:>8,} {row['seconds']:>8.1f} {row['docs_per_s']:>9,.0f} "
            f"{row['upload_s']:>9.1f} {row['upload_docs_per_s']:>14,.0f}"
        ],
    )
    print_table(
        "worker time by phase (summed over shards):",
        (f"  {name:<9} {phases[name]:>8.1f}s  {row['phase_share'][name]:>6.1%}" for name in PHASES),
    )
    write_results(args.out, {"result": row})


if __name__ == "__main__":
    main()
