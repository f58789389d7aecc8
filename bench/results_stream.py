"""Streaming a big job's results as JSONL, CSV and Parquet from `postroom api`: throughput and the
API's memory (RSS), which must stay flat whatever the job's size (Parquet goes out one row group
at a time).

    .venv/bin/python bench/results_stream.py              # 1,000,000 results
    .venv/bin/python bench/results_stream.py --docs 200000

A fresh stack (bench/stack.py) with the API only; the job's result rows are filled in SQL. The
API's RSS is sampled from /proc every 50 ms while each format streams to /dev/null. Prints a
table and writes bench/results/results_stream.json.
"""

from __future__ import annotations

import threading
import time

import httpx
from ingest import rss_kb
from report import bench_parser, parse_bench_args, print_table, scratch_dir, write_results
from retention import fill_job
from stack import Stack, bench_settings

from postroom.storage import Storage


def stream(stack: Stack, job_id: str, fmt: str) -> dict[str, float]:
    pid = stack.api.pid
    samples: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.05):
            samples.append(rss_kb(pid))

    before = rss_kb(pid)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    size = 0
    t0 = time.monotonic()
    with httpx.stream(
        "GET",
        f"{stack.api_url}/v1/jobs/{job_id}/results",
        params={"format": fmt},
        headers={"Authorization": f"Bearer {stack.key}"},
        timeout=httpx.Timeout(1800.0, connect=10.0),
    ) as response:
        response.raise_for_status()
        for chunk in response.iter_bytes(1 << 16):
            size += len(chunk)
    seconds = time.monotonic() - t0
    stop.set()
    sampler.join()
    samples = samples or [before]
    quarter = max(1, len(samples) // 4)
    return {
        "seconds": round(seconds, 2),
        "mb": round(size / 1e6, 1),
        "rss_mb_before": round(before / 1024, 1),
        "rss_mb_first_quarter_max": round(max(samples[:quarter]) / 1024, 1),
        "rss_mb_last_quarter_max": round(max(samples[-quarter:]) / 1024, 1),
        "rss_mb_max": round(max(samples) / 1024, 1),
    }


def main() -> None:
    parser = bench_parser(__doc__ or "")
    parser.add_argument("--docs", type=int, default=1_000_000)
    args = parse_bench_args(parser, "results_stream")
    logs = scratch_dir("results-stream")
    with Stack(bench_settings(), logs, workers=[]) as stack:
        job_id = str(
            fill_job(
                stack.sessions,
                Storage(stack.settings),
                docs=args.docs,
                days_ago=0,
                tenant="bench",
            )
        )
        runs = {fmt: stream(stack, job_id, fmt) for fmt in ("jsonl", "csv", "parquet")}
    print_table(
        f"{'format':<8} {'docs':>10} {'seconds':>8} {'docs/s':>9} {'MB':>8} "
        f"{'RSS before':>11} {'1st-quarter max':>16} {'last-quarter max':>17}",
        (
            f"{fmt:<8} {args.docs:>10,} {run['seconds']:>8.1f} "
            f"{args.docs / run['seconds']:>9,.0f} {run['mb']:>8.1f} "
            f"{run['rss_mb_before']:>9.0f}MB {run['rss_mb_first_quarter_max']:>14.0f}MB "
            f"{run['rss_mb_last_quarter_max']:>15.0f}MB"
            for fmt, run in runs.items()
        ),
    )
    write_results(args.out, {"docs": args.docs, "formats": runs})


if __name__ == "__main__":
    main()
