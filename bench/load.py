"""Offered load at 1x, 2x and 3x the measured peak: jobs arrive over time with deadlines, a GPU
worker and a spill worker (stand-in managed API) share them, the router decides.

    .venv/bin/python bench/load.py                     # 30 s of arrivals per level
    .venv/bin/python bench/load.py --seconds 20 --levels 1,3

The GPU's peak is measured first: the best of two bursts of 12 jobs at once (GPU only), first
upload to last `finished_at`. Reports per level: completion time, throughput (all, GPU), peak queue
depth, the share of time the GPU queue sat empty while work waited on spill, spill share, deadline
misses, failures and lost documents; the failure mode must be graceful (queues grow, spill rises,
throughput holds, nothing fails or is lost). Writes bench/results/load.json and
bench/results/load.png (queue depth and throughput over time, per route).
"""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from ceiling import write_docs
from report import bench_parser, parse_bench_args, print_table, scratch_dir, write_results
from sqlalchemy import func, select
from stack import LABELS, Stack, bench_settings

from postroom.db.models import Shard
from postroom.queue import QUEUE_SPILL
from postroom_cli.local import free_port
from postroom_cli.standin import StandinServer

JOB_DOCS = 400
BURST_JOBS = 12


def snapshot(stack: Stack) -> dict[str, int]:
    """Documents waiting or running per route, and documents finished per route so far."""
    with stack.sessions() as session:
        waiting = session.execute(
            select(Shard.queue, func.sum(Shard.doc_count))
            .where(Shard.state.in_(("queued", "expired", "running")))
            .group_by(Shard.queue)
        ).all()
        done = session.execute(
            select(Shard.route, func.sum(Shard.doc_count))
            .where(Shard.state == "done")
            .group_by(Shard.route)
        ).all()
    out = {"queue_gpu": 0, "queue_spill": 0, "done_gpu": 0, "done_spill": 0}
    for queue, docs in waiting:
        out["queue_spill" if queue == QUEUE_SPILL else "queue_gpu"] += int(docs or 0)
    for route, docs in done:
        out[f"done_{route}"] = int(docs or 0)
    return out


def burst(stack: Stack, path: Path, jobs: int) -> float:
    """`jobs` jobs at once (no deadline, GPU only): docs/s from the first upload to the last
    `finished_at`, the GPU's sustained peak with the whole pipeline around it."""
    t0 = time.time()
    ids = [
        stack.client.upload(path, {"labels": json.dumps(LABELS), "spill": "never"})["id"]
        for _ in range(jobs)
    ]
    results = stack.wait_jobs(ids, timeout=600)
    last = max(datetime.fromisoformat(j["finished_at"]).timestamp() for j in results)
    return jobs * JOB_DOCS / (last - t0)


def run_level(
    stack: Stack, path: Path, rate: float, seconds: float, deadline: float
) -> dict[str, Any]:
    interval = JOB_DOCS / rate
    jobs: list[str] = []
    series: list[dict[str, float]] = []
    stop = threading.Event()
    t0 = time.monotonic()
    start = snapshot(stack)

    def sample() -> None:
        while not stop.wait(0.5):
            now = snapshot(stack)
            for route in ("gpu", "spill"):
                now[f"done_{route}"] -= start[f"done_{route}"]
            series.append({"t": round(time.monotonic() - t0, 2), **now})

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
    try:
        results = stack.wait_jobs(jobs, timeout=max(300.0, 6 * seconds))
    finally:
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
    gpu_busy = [p for p in series if p["queue_gpu"] or p["queue_spill"]]
    return {
        "offered_docs_per_s": round(rate, 1),
        "jobs": len(results),
        "docs": docs,
        "completion_s": round(wall, 1),
        "throughput_docs_per_s": round(docs / wall, 1),
        "gpu_docs_per_s": round((docs - spilled) / wall, 1),
        "peak_queue_docs": max((p["queue_gpu"] + p["queue_spill"] for p in series), default=0),
        "peak_spill_queue_docs": max((p["queue_spill"] for p in series), default=0),
        # Samples where work waited somewhere but the GPU queue was empty: the GPU idled.
        "gpu_idle_while_backlog": round(
            sum(1 for p in gpu_busy if not p["queue_gpu"]) / len(gpu_busy), 3
        )
        if gpu_busy
        else 0.0,
        "spill_share": round(spilled / docs, 3) if docs else 0.0,
        "deadline_misses": missed,
        "failed": failed,
        "lost": docs - done - failed,
        "series": series,
    }


def rate_series(series: list[dict[str, float]], key: str, window: int = 10) -> list[float]:
    """Docs/s finished over the last `window` samples (0.5 s apart). Shards finish 256 documents
    at a time, several together, so a shorter window shows gaps between them as dips."""
    out = []
    for i, point in enumerate(series):
        j = max(0, i - window)
        span = point["t"] - series[j]["t"]
        out.append((point[key] - series[j][key]) / span if span else 0.0)
    return out


def plot(levels: list[dict[str, Any]], peak: float, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(levels), figsize=(5 * len(levels), 7), squeeze=False)
    for column, level in enumerate(levels):
        series = level["series"]
        ts = [p["t"] for p in series]
        top, bottom = axes[0][column], axes[1][column]
        top.stackplot(
            ts,
            [p["queue_gpu"] for p in series],
            [p["queue_spill"] for p in series],
            labels=["GPU queue", "spill queue"],
        )
        top.set(title=f"{level['multiplier']:g}x peak: documents waiting", xlabel="seconds")
        top.legend(loc="upper right")
        bottom.stackplot(
            ts,
            rate_series(series, "done_gpu"),
            rate_series(series, "done_spill"),
            labels=["GPU", "spill"],
        )
        bottom.axhline(peak, color="black", linestyle="--", linewidth=1, label="GPU peak")
        bottom.set(title="throughput (docs/s, 5 s window)", xlabel="seconds")
        bottom.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(out, dpi=90)


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--levels", default="1,2,3")
    parser.add_argument("--deadline", type=float, default=20.0)
    parser.add_argument("--latency", type=float, default=0.2)
    args = parse_bench_args(parser, "load")
    logs = scratch_dir("load")
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
            stack.run_job(path, JOB_DOCS, spill="never")  # warm-up
            peak = max(burst(stack, path, BURST_JOBS) for _ in range(2))
            for multiplier in (float(m) for m in args.levels.split(",")):
                level = run_level(stack, path, peak * multiplier, args.seconds, args.deadline)
                levels.append({"multiplier": multiplier, **level})
    finally:
        standin.stop()
    print(
        f"measured GPU peak: {peak:.0f} docs/s (best of two bursts of {BURST_JOBS} jobs of "
        f"{JOB_DOCS}); jobs arrive for {args.seconds:g}s, deadline {args.deadline:g}s each"
    )
    print_table(
        f"{'load':>5} {'offered/s':>10} {'jobs':>5} {'docs':>7} {'done in':>8} {'docs/s':>8} "
        f"{'GPU/s':>6} {'peak queue':>11} {'GPU idle':>9} {'spill':>6} {'missed':>7} "
        f"{'failed':>7} {'lost':>5}",
        (
            f"{lv['multiplier']:>4g}x {lv['offered_docs_per_s']:>10,.0f} {lv['jobs']:>5} "
            f"{lv['docs']:>7,} {lv['completion_s']:>7.0f}s {lv['throughput_docs_per_s']:>8,.0f} "
            f"{lv['gpu_docs_per_s']:>6,.0f} {lv['peak_queue_docs']:>11,} "
            f"{lv['gpu_idle_while_backlog']:>9.1%} {lv['spill_share']:>6.1%} "
            f"{lv['deadline_misses']:>4}/{lv['jobs']:<2} {lv['failed']:>7} {lv['lost']:>5}"
            for lv in levels
        ),
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    png = args.out.with_suffix(".png")
    plot(levels, peak, png)
    write_results(args.out, {"peak_docs_per_s": peak, "levels": levels}, also=f" and {png}")


if __name__ == "__main__":
    main()
