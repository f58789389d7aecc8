"""Streamed upload: 1,000,000 documents through POST /v1/jobs/upload; accepted docs/s and the
API's peak RSS (it must stay flat: the file is never held in memory).

    .venv/bin/python bench/ingest.py                  # 1,000,000 docs
    .venv/bin/python bench/ingest.py --docs 200000

No worker runs: the job is accepted (validated, sharded, written to S3, committed, published) and
then cancelled. The API's RSS is sampled from /proc every 50 ms. Prints a table and writes
bench/results/ingest.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
from sqlalchemy.dialects.postgresql import insert
from stack import LABELS, ROOT, Stack, bench_settings

from postroom.db.models import Worker


def lines(count: int, *, seed: int = 11) -> Iterator[bytes]:
    from worker.models import WORDS

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=1_000_000)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "ingest.json")
    args = parser.parse_args()
    logs = Path(tempfile.mkdtemp(prefix="postroom-ingest-"))
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
        pid = stack.api.pid
        samples: list[int] = []
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.05):
                samples.append(rss_kb(pid))

        baseline = rss_kb(pid)
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t0 = time.monotonic()
        response = httpx.post(
            f"{stack.api_url}/v1/jobs/upload",
            params={"labels": json.dumps(LABELS)},
            content=lines(args.docs),
            headers={
                "Authorization": f"Bearer {stack.key}",
                "Content-Type": "application/x-ndjson",
            },
            timeout=httpx.Timeout(1800.0, connect=10.0),
        )
        seconds = time.monotonic() - t0
        stop.set()
        sampler.join()
        response.raise_for_status()
        job = response.json()
        stack.client.cancel(job["id"])
        peak = rss_kb(pid, "VmHWM")
    quarter = max(1, len(samples) // 4)
    row = {
        "docs": args.docs,
        "seconds": round(seconds, 2),
        "docs_per_s": round(args.docs / seconds, 1),
        "shards": job["shards"],
        "api_rss_mb_before": round(baseline / 1024, 1),
        "api_rss_mb_peak": round(peak / 1024, 1),
        "api_rss_mb_first_quarter_max": round(max(samples[:quarter]) / 1024, 1),
        "api_rss_mb_last_quarter_max": round(max(samples[-quarter:]) / 1024, 1),
    }
    print(
        f"{'docs':>10} {'seconds':>8} {'docs/s':>9} {'RSS before':>11} {'RSS peak':>9}"
        f" {'1st-quarter max':>16} {'last-quarter max':>17}"
    )
    print(
        f"{row['docs']:>10,} {row['seconds']:>8.1f} {row['docs_per_s']:>9,.0f} "
        f"{row['api_rss_mb_before']:>9.0f}MB {row['api_rss_mb_peak']:>7.0f}MB "
        f"{row['api_rss_mb_first_quarter_max']:>14.0f}MB "
        f"{row['api_rss_mb_last_quarter_max']:>15.0f}MB"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} CPUs, no GPU"}
    args.out.write_text(json.dumps({**meta, "result": row}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
