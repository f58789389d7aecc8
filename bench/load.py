"""Offered load at 1x, 2x and 3x the measured peak: jobs arrive over time with deadlines, a GPU
worker and a spill worker (stand-in managed API) share them, the router decides.

    .venv/bin/python bench/load.py                     # 30 s of arrivals per level
    .venv/bin/python bench/load.py --seconds 20 --levels 1,3

Reports per level: completion time, peak queue depth, spill share, deadline misses, failures and
lost documents; the failure mode must be graceful (queues grow, spill rises, nothing fails or is
lost). Writes bench/results/load.json and bench/results/load.png (queue depth and throughput).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from ceiling import write_docs
from sqlalchemy import func, select
from stack import LABELS, ROOT, Stack, bench_settings

from postroom.db.models import Shard
from postroom_cli.local import free_port
from postroom_cli.standin import StandinServer

JOB_DOCS = 400


def depth(stack: Stack) -> int:
    with stack.sessions() as session:
        return int(
            session.scalar(
                select(func.coalesce(func.sum(Shard.doc_count), 0)).where(
                    Shard.state.in_(("queued", "expired", "running"))
                )
            )
            or 0
        )


def run_level(
    stack: Stack, path: Path, rate: float, seconds: float, deadline: float
) -> dict[str, Any]:
    interval = JOB_DOCS / rate
    jobs: list[str] = []
    series: list[tuple[float, int]] = []
    stop = threading.Event()
    t0 = time.monotonic()

    def sample() -> None:
        while not stop.wait(0.5):
            series.append((time.monotonic() - t0, depth(stack)))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    next_at = 0.0
    while (elapsed := time.monotonic() - t0) < seconds:
        if elapsed >= next_at:
            job = stack.client.upload(
                path, {"labels": json.dumps(LABELS), "deadline": str(deadline)}
            )
            jobs.append(job["id"])
            next_at += interval
        time.sleep(0.02)
    results = []
    for job_id in jobs:
        while (job := stack.client.job(job_id))["status"] not in ("completed", "failed"):
            time.sleep(0.2)
        results.append(job)
    stop.set()
    sampler.join()
    wall = time.monotonic() - t0
    docs = sum(j["counts"]["total"] for j in results)
    done = sum(j["counts"]["succeeded"] for j in results)
    failed = sum(j["counts"]["failed"] for j in results)
    spilled = sum(j["counts"]["spilled"] for j in results)
    missed = sum(
        1
        for j in results
        if datetime.fromisoformat(j["finished_at"]) > datetime.fromisoformat(j["deadline"])
    )
    return {
        "offered_docs_per_s": round(rate, 1),
        "jobs": len(results),
        "docs": docs,
        "completion_s": round(wall, 1),
        "throughput_docs_per_s": round(docs / wall, 1),
        "peak_queue_docs": max((d for _, d in series), default=0),
        "spill_share": round(spilled / docs, 3) if docs else 0.0,
        "deadline_misses": missed,
        "failed": failed,
        "lost": docs - done - failed,
        "series": series,
    }


def plot(levels: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for level in levels:
        xs = [t for t, _ in level["series"]]
        ys = [d for _, d in level["series"]]
        axes[0].plot(xs, ys, label=f"{level['multiplier']}x peak")
    axes[0].set(title="queue depth (documents)", xlabel="seconds")
    axes[0].legend()
    names = [f"{lv['multiplier']}x" for lv in levels]
    axes[1].bar(names, [lv["throughput_docs_per_s"] for lv in levels], label="throughput")
    axes[1].bar(
        names,
        [lv["throughput_docs_per_s"] * lv["spill_share"] for lv in levels],
        label="of which spilled",
    )
    axes[1].set(title="throughput (docs/s)")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--levels", default="1,2,3")
    parser.add_argument("--deadline", type=float, default=20.0)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "load.json")
    args = parser.parse_args()
    logs = Path(tempfile.mkdtemp(prefix="postroom-load-"))
    path = logs / "job.jsonl"
    write_docs(path, JOB_DOCS)
    standin = StandinServer(free_port()).start()
    standin.set_faults(latency=args.latency)
    settings = bench_settings(
        spill_base_url=standin.url,
        spill_model="standin",
        router_interval_seconds=1.0,
        router_drain_window_seconds=15.0,
        gpu_dead_after=10,
    )
    workers = [
        ["worker", "--concurrency", "8"],
        ["worker", "--route", "spill", "--concurrency", "8"],
    ]
    levels = []
    try:
        with Stack(settings, logs, workers=workers, beat=True) as stack:
            calibration = stack.run_job(path, JOB_DOCS, spill="never")
            stack.run_job(path, JOB_DOCS, spill="never")
            peak = JOB_DOCS / (calibration["seconds"])
            peak = max(peak, stack.run_job(path, JOB_DOCS, spill="never")["docs_per_s"])
            for multiplier in (float(m) for m in args.levels.split(",")):
                level = run_level(stack, path, peak * multiplier, args.seconds, args.deadline)
                levels.append({"multiplier": multiplier, **level})
    finally:
        standin.stop()
    print(f"measured GPU peak: {peak:.0f} docs/s (jobs of {JOB_DOCS}, deadline {args.deadline:g}s)")
    print(
        f"{'load':>5} {'offered/s':>10} {'jobs':>5} {'docs':>7} {'done in':>8} {'docs/s':>8} "
        f"{'peak queue':>11} {'spill':>6} {'missed':>7} {'failed':>7} {'lost':>5}"
    )
    for lv in levels:
        print(
            f"{lv['multiplier']:>4g}x {lv['offered_docs_per_s']:>10,.0f} {lv['jobs']:>5} "
            f"{lv['docs']:>7,} {lv['completion_s']:>7.0f}s {lv['throughput_docs_per_s']:>8,.0f} "
            f"{lv['peak_queue_docs']:>11,} {lv['spill_share']:>6.1%} {lv['deadline_misses']:>7} "
            f"{lv['failed']:>7} {lv['lost']:>5}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    png = args.out.with_suffix(".png")
    plot(levels, png)
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} CPUs, no GPU"}
    args.out.write_text(json.dumps({**meta, "peak_docs_per_s": peak, "levels": levels}, indent=2))
    print(f"wrote {args.out} and {png}")


if __name__ == "__main__":
    main()
