"""The PNG beside the JSON: documents finished per second over each job's time, per run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

WINDOW_S = 2.0


def rate(timeline: list[list[float]]) -> tuple[list[float], list[float]]:
    """Docs/s finished over the last WINDOW_S seconds at each sample."""
    ts, rates, j = [], [], 0
    for t, done in timeline:
        while timeline[j][0] < t - WINDOW_S:
            j += 1
        span = t - timeline[j][0]
        ts.append(t)
        rates.append((done - timeline[j][1]) / span if span else 0.0)
    return ts, rates


def plot_load(report: dict[str, Any], out: Path) -> bool:
    """bench/load.py's picture (queue and throughput over time per route) of the load levels."""
    for run in report.get("runs") or [report]:
        for r in run["shapes"].values():
            if (load := r.get("load")) and load.get("levels"):
                from bench.gpu.stack.load import bench_module

                bench_module("load").plot(load["levels"], load["peak_docs_per_s"], out)
                return True
    return False


def plot(report: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report.get("runs") or [report]
    panels = [
        (f"run {n + 1} {shape}", r)
        for n, run in enumerate(runs)
        for shape, r in run["shapes"].items()
    ]
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 2.6 * len(panels)), squeeze=False)
    for ax, (title, r) in zip(axes[:, 0], panels, strict=True):
        for kind in ("b", "kill-worker", "restart-redis"):
            if (job := r.get(kind)) and job.get("timeline"):
                ax.plot(*rate(job["timeline"]), label=f"{kind} ({job['docs_per_s']} docs/s)")
        if a := (r.get("a") or {}).get("docs_per_s"):
            ax.axhline(a, color="black", linestyle="--", linewidth=1, label=f"(a) raw {a} docs/s")
        ax.set(title=f"{title}: documents finished per second ({WINDOW_S:g} s window)")
        ax.set(xlabel="seconds from the upload's first byte")
        ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
