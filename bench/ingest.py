"""Streamed upload: 1,000,000 documents through POST /v1/jobs/upload; accepted docs/s and the
API's peak RSS (it must stay flat: the file is never held in memory).

    .venv/bin/python bench/ingest.py                  # 1,000,000 docs, 2 uploads
    .venv/bin/python bench/ingest.py --docs 200000 --repeats 3

The file is generated once (fixed seed) and streamed from disk, so the client costs little of the
two cores. No worker runs: each job is accepted (validated, sharded, written to S3, committed,
published) and then cancelled. The API's RSS is sampled from /proc every 50 ms and its CPU time
read before and after. Prints a table and writes bench/results/ingest.json.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
from report import bench_parser, parse_bench_args, print_table, scratch_dir, write_results
from sqlalchemy.dialects.postgresql import insert
from stack import LABELS, Stack, bench_settings

from postroom.db.models import Worker

CHUNK = 1024 * 1024


def lines(count: int, *, seed: int = 11) -> Iterator[bytes]:
    from worker.tiny_model import WORDS

    rng = random.Random(seed)
    batch = []
    for i in range(count):
        text = " ".join(rng.choices(WORDS, k=rng.randint(10, 60)))
        batch.append(json.dumps({"id": f"i{i:08d}", "text": text}))
        if len(batch) == 2000:
            yield ("\n".join(batch) + "\n").encode()
            batch = []
    if batch:
        yield ("\n".join(batch) + "\n").encode()


def rss_kb(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def file_chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            yield chunk


def upload(stack: Stack, path: Path, docs: int) -> dict[str, float]:
    """One streamed upload; the API's RSS samples, CPU time and the accepted job."""
    pid = stack.api.pid
    samples: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.05):
            samples.append(rss_kb(pid))

    baseline, cpu0 = rss_kb(pid), cpu_seconds(pid)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.monotonic()
    response = httpx.post(
        f"{stack.api_url}/v1/jobs/upload",
        params={"labels": json.dumps(LABELS)},
        content=file_chunks(path),
        headers={"Authorization": f"Bearer {stack.key}", "Content-Type": "application/x-ndjson"},
        timeout=httpx.Timeout(1800.0, connect=10.0),
    )
    seconds = time.monotonic() - t0
    stop.set()
    sampler.join()
    cpu = cpu_seconds(pid) - cpu0
    response.raise_for_status()
    job = response.json()
    stack.client.cancel(job["id"])
    quarter = max(1, len(samples) // 4)
    return {
        "seconds": round(seconds, 2),
        "docs_per_s": round(docs / seconds, 1),
        "api_cpu_s": round(cpu, 2),
        "api_cpu_us_per_doc": round(cpu / docs * 1e6, 1),
        "shards": job["shards"],
        "api_rss_mb_before": round(baseline / 1024, 1),
        "api_rss_mb_first_quarter_max": round(max(samples[:quarter]) / 1024, 1),
        "api_rss_mb_last_quarter_max": round(max(samples[-quarter:]) / 1024, 1),
    }


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--docs", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=2)
    args = parse_bench_args(parser, "ingest")
    logs = scratch_dir("ingest")
    body = logs / "upload.jsonl"
    with body.open("wb") as f:
        for chunk in lines(args.docs):
            f.write(chunk)
    print(f"{args.docs:,} documents, {body.stat().st_size / 1e6:,.0f} MB")
    with Stack(bench_settings(), logs, workers=[]) as stack:
        with stack.sessions.begin() as session:  # a registered GPU worker: the model is served
            session.execute(
                insert(Worker).values(
                    name="gpu@bench:0",
                    route="gpu",
                    models=["tiny"],
                    stats={},
                    heartbeat_at=datetime.now(UTC),
                )
            )
        runs = [upload(stack, body, args.docs) for _ in range(args.repeats)]
        peak = rss_kb(stack.api.pid, "VmHWM")
    body.unlink()
    print_table(
        f"{'run':>4} {'docs':>10} {'seconds':>8} {'docs/s':>9} {'API CPU/doc':>12}"
        f" {'RSS before':>11} {'1st-quarter max':>16} {'last-quarter max':>17}",
        (
            f"{n:>4} {args.docs:>10,} {run['seconds']:>8.1f} {run['docs_per_s']:>9,.0f} "
            f"{run['api_cpu_us_per_doc']:>10.1f}µs {run['api_rss_mb_before']:>9.0f}MB "
            f"{run['api_rss_mb_first_quarter_max']:>14.0f}MB "
            f"{run['api_rss_mb_last_quarter_max']:>15.0f}MB"
            for n, run in enumerate(runs, start=1)
        ),
    )
    row = {
        "docs": args.docs,
        "docs_per_s_median": round(statistics.median(r["docs_per_s"] for r in runs), 1),
        "api_cpu_us_per_doc_median": round(
            statistics.median(r["api_cpu_us_per_doc"] for r in runs), 1
        ),
        "api_rss_mb_peak": round(peak / 1024, 1),
        "runs": runs,
    }
    print(
        f"median {row['docs_per_s_median']:,.0f} docs/s; "
        f"API peak RSS {row['api_rss_mb_peak']:.0f} MB"
    )
    write_results(args.out, {"result": row})


if __name__ == "__main__":
    main()
