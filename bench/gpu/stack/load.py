"""Offered load at multiples of the GPU's measured peak on the whole stack, with spill:
bench/load.py's burst (the peak: best of two bursts of `--load-burst-jobs` jobs, 12 by default,
GPU only) and levels (jobs of 400 documents arriving at multiple x peak for some seconds, each
with a deadline; the router spills what the GPU cannot finish in time) on a `GpuStack` with a
spill worker, against the stand-in managed API of postroom_cli/standin.py (latency a timer,
answers a hash: no CPU of note)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from bench.gpu.stack.services import GpuStack

BENCH = Path(__file__).resolve().parents[2]


def spill_settings(standin_url: str) -> dict[str, Any]:
    """The router settings bench/load.py measures with, plus the stand-in as the managed API."""
    return {
        "spill_base_url": standin_url,
        "spill_model": "standin",
        "router_interval_seconds": 1.0,
        "router_drain_window_seconds": 15.0,
        "gpu_dead_after": 10,
    }


def bench_module(name: str) -> Any:
    """A module of bench/ (they import their siblings by name, so bench/ goes on sys.path)."""
    import importlib

    if str(BENCH) not in sys.path:
        sys.path.append(str(BENCH))
    return importlib.import_module(name)


def run_load(
    stack: GpuStack, opts: argparse.Namespace, work: Path, log: Any, save: Any
) -> dict[str, Any]:
    """The levels of opts.load; `save(partial)` after each (a run cut short keeps those)."""
    levels_of = bench_module("load")
    path = work / "load-job.jsonl"
    bench_module("ceiling").write_docs(path, levels_of.JOB_DOCS)
    peak = max(levels_of.burst(stack, path, opts.load_burst_jobs) for _ in range(2))
    log(f"   load: GPU peak {peak:.0f} docs/s (best of two bursts of {opts.load_burst_jobs} jobs)")
    levels: list[dict[str, Any]] = []
    out = {
        "peak_docs_per_s": round(peak, 1),
        "seconds": opts.load_seconds,
        "deadline_s": opts.load_deadline,
        "latency_s": opts.load_latency,
        "levels": levels,
    }
    for multiplier in (float(m) for m in opts.load.split(",")):
        started = time.monotonic()
        level = levels_of.run_level(
            stack,
            path,
            peak * multiplier,
            opts.load_seconds,
            opts.load_deadline,
            gpu_rate=peak,
            spill_rate=levels_of.spill_capacity(stack.settings, opts.load_latency),
        )
        levels.append({"multiplier": multiplier, **level})
        log(
            f"   load {multiplier:g}x: {level['throughput_docs_per_s']} docs/s "
            f"(GPU {level['gpu_docs_per_s']}), spill {level['spill_share']:.1%}, "
            f"missed {level['deadline_misses']}/{level['jobs']} "
            f"(feasible {level['feasible_misses']}/{level['feasible_jobs']}), "
            f"needed spill {level['spill_needed_share']:.1%}, lost {level['lost']} "
            f"({time.monotonic() - started:.0f}s)"
        )
        save(out)
    png = work / "load.png"
    levels_of.plot(levels, peak, png)
    return {**out, "png": str(png)}
