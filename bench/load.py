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


def ideal_split(
    jobs: list[tuple[float, float, int]], *, gpu_rate: float, spill_rate: float
) -> dict[str, Any]:
    """What routing with perfect knowledge could do with these arrivals: (arrival, due, docs) per
    job in arrival order, times in seconds; the GPU drains `gpu_rate` docs/s, spill `spill_rate`.

    A fluid model. The GPU keeps of each job what it can finish by the job's deadline behind what
    it kept of earlier jobs (first come, first served, which is earliest deadline first when every
    job has the same deadline), and the rest is what the deadline needs spilled; spill finishes
    those parts first come, first served. A job is feasible when its spilled part finishes in time
    too. An infeasible job is set aside (it takes no capacity from later jobs), so "feasible" is
    generous and the goal it sets (no feasible job misses) strict. Shards are not modelled.
    """
    gpu_free = spill_free = 0.0
    feasible: list[bool] = []
    needed = 0.0
    for arrival, due, docs in jobs:
        start = max(arrival, gpu_free)
        kept = min(float(docs), max(0.0, (due - start) * gpu_rate))
        rest = docs - kept
        spill_done = max(arrival, spill_free) + rest / spill_rate if rest > 0 else arrival
        ok = spill_done <= due
        feasible.append(ok)
        if ok:
            gpu_free = start + kept / gpu_rate
            spill_free = spill_done if rest > 0 else spill_free
            needed += rest
    return {"feasible": feasible, "spill_needed_docs": round(needed)}


def _at(job: dict[str, Any], key: str) -> float:
    """A job's timestamp field (created_at, deadline, finished_at) in seconds since the epoch."""
    return datetime.fromisoformat(job[key]).timestamp()


def judge_deadlines(
    results: list[dict[str, Any]], *, gpu_rate: float, spill_rate: float
) -> dict[str, Any]:
    """Each finished job against `ideal_split`: how many could have met their deadline, how many
    of those missed it, and the share of documents the deadlines needed spilled."""

    ordered = sorted(results, key=lambda j: _at(j, "created_at"))
    ideal = ideal_split(
        [(_at(j, "created_at"), _at(j, "deadline"), j["counts"]["total"]) for j in ordered],
        gpu_rate=gpu_rate,
        spill_rate=spill_rate,
    )
    missed = [_at(j, "finished_at") > _at(j, "deadline") for j in ordered]
    docs = sum(j["counts"]["total"] for j in ordered)
    return {
        "feasible_jobs": sum(ideal["feasible"]),
        "feasible_misses": sum(f and m for f, m in zip(ideal["feasible"], missed, strict=True)),
        "spill_needed_share": round(ideal["spill_needed_docs"] / docs, 3) if docs else 0.0,
        "ideal_rates": {"gpu": round(gpu_rate, 1), "spill": round(spill_rate, 1)},
    }


def spill_capacity(settings: Any, latency: float, spill_workers: int = 1) -> float:
    """Docs/s the spill route can finish against a stand-in answering in `latency` s: each spill
    worker keeps POSTROOM_SPILL_CONCURRENCY calls in flight (Little's law; bench/spill.py measured
    0.93-0.97 of it)."""
    return spill_workers * settings.spill_concurrency / latency


def run_level(
    stack: Stack,
    path: Path,
    rate: float,
    seconds: float,
    deadline: float,
    *,
    gpu_rate: float,
    spill_rate: float,
) -> dict[str, Any]:
    """Jobs offered at `rate` docs/s for `seconds`, each due `deadline` s after it arrives; judged
    against what the GPU (`gpu_rate`, its measured peak) and spill (`spill_rate`) could do."""
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
        **judge_deadlines(results, gpu_rate=gpu_rate, spill_rate=spill_rate),
        "failed": failed,
        "lost": docs - done - failed,
        "series": series,
        "job_times": _job_times(results),
    }


def _job_times(results: list[dict[str, Any]]) -> list[list[float]]:
    """[arrived, due, finished] (s after the first arrival), documents and documents spilled,
    per job: enough to judge the level again with other rates."""

    t0 = min((_at(j, "created_at") for j in results), default=0.0)
    return [
        [
            *(round(_at(j, key) - t0, 3) for key in ("created_at", "deadline", "finished_at")),
            j["counts"]["total"],
            j["counts"]["spilled"],
        ]
        for j in sorted(results, key=lambda j: _at(j, "created_at"))
    ]


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
                level = run_level(
                    stack,
                    path,
                    peak * multiplier,
                    args.seconds,
                    args.deadline,
                    gpu_rate=peak,
                    spill_rate=spill_capacity(stack.settings, args.latency),
                )
                levels.append({"multiplier": multiplier, **level})
    finally:
        standin.stop()
    print(
        f"measured GPU peak: {peak:.0f} docs/s (best of two bursts of {BURST_JOBS} jobs of "
        f"{JOB_DOCS}); jobs arrive for {args.seconds:g}s, deadline {args.deadline:g}s each"
    )
    print_table(
        f"{'load':>5} {'offered/s':>10} {'jobs':>5} {'docs':>7} {'done in':>8} {'docs/s':>8} "
        f"{'GPU/s':>6} {'peak queue':>11} {'GPU idle':>9} {'spill':>6} {'needed':>7} "
        f"{'missed':>7} {'feasible missed':>16} {'failed':>7} {'lost':>5}",
        (
            f"{lv['multiplier']:>4g}x {lv['offered_docs_per_s']:>10,.0f} {lv['jobs']:>5} "
            f"{lv['docs']:>7,} {lv['completion_s']:>7.0f}s {lv['throughput_docs_per_s']:>8,.0f} "
            f"{lv['gpu_docs_per_s']:>6,.0f} {lv['peak_queue_docs']:>11,} "
            f"{lv['gpu_idle_while_backlog']:>9.1%} {lv['spill_share']:>6.1%} "
            f"{lv['spill_needed_share']:>7.1%} {lv['deadline_misses']:>4}/{lv['jobs']:<2} "
            f"{lv['feasible_misses']:>12}/{lv['feasible_jobs']:<3} "
            f"{lv['failed']:>7} {lv['lost']:>5}"
            for lv in levels
        ),
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    png = args.out.with_suffix(".png")
    plot(levels, peak, png)
    write_results(args.out, {"peak_docs_per_s": peak, "levels": levels}, also=f" and {png}")


if __name__ == "__main__":
    main()
