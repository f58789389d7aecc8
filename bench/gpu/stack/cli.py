"""Arguments, the run over shapes, the JSON report and its table (also for merged reports)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.gpu.stack import __doc__ as DOC
from bench.gpu.stack.measure import run_shape
from bench.gpu.stack.plot import plot, plot_load

ROOT = Path(__file__).resolve().parents[3]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=DOC, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shapes", default="0.5b", help="tiny, 0.5b, 1.5b (comma-separated)")
    p.add_argument("--docs", type=int, default=30000)
    p.add_argument("--warm-docs", type=int, default=512, help="a warm-up job first")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--engine", default="t32k", help="engine settings of bench/gpu/config.ENGINES")
    p.add_argument("--raw-repeats", type=int, default=2, help="(a) passes; 0 skips (a)")
    p.add_argument("--concurrency", type=int, default=8, help="postroom worker --concurrency")
    p.add_argument("--shard-size", type=int, default=256, help="POSTROOM_SHARD_SIZE")
    p.add_argument("--inflight-factor", type=float, default=4.0)
    p.add_argument("--faults", default="", help="after (b): kill-worker,restart-redis")
    p.add_argument(
        "--worker-env",
        action="append",
        default=[],
        metavar="K=V[,K=V]",
        help="(b) again on a restarted worker with these settings (repeatable; '' = as is)",
    )
    p.add_argument("--job-timeout", type=float, default=3600, help="per job, s")
    p.add_argument("--lease-seconds", type=int, default=120, help="POSTROOM_LEASE_SECONDS")
    p.add_argument("--fault-at", type=float, default=0.3, help="share of the job done")
    p.add_argument("--load", default="", help="after (b): levels, e.g. 1,2,3 (x the GPU peak)")
    p.add_argument("--load-seconds", type=float, default=30.0, help="arrivals per level")
    p.add_argument("--load-deadline", type=float, default=20.0, help="each job's deadline, s")
    p.add_argument("--load-latency", type=float, default=0.2, help="the stand-in's, s")
    p.add_argument("--load-burst-jobs", type=int, default=12, help="jobs per peak burst")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--kv-cache-bytes", type=int, default=512 * 1024 * 1024, help="CPU only")
    p.add_argument("--host-cores", type=int, default=os.cpu_count() or 1)
    p.add_argument("--work-dir", default="/tmp/postroom-stack")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu-stack.json"))
    p.add_argument("--log", default=None, help="full log (work dir)")
    p.add_argument("--verbose", action="store_true", help="echo the children's output")
    p.add_argument("--merge", nargs="+", metavar="JSON", help="merge reports, print the table")
    return p.parse_args(argv)


def run(opts: argparse.Namespace) -> dict[str, Any]:
    Path(opts.work_dir).mkdir(parents=True, exist_ok=True)
    log_path = Path(opts.log or Path(opts.work_dir) / "stack.log")

    def log(line: str, echo: bool = True) -> None:
        stamped = f"{time.strftime('%H:%M:%S')} {line}"
        with log_path.open("a") as log_file:
            log_file.write(stamped + "\n")
        if echo:
            print(stamped, flush=True)

    report: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "device": opts.device,
        "shapes": {},
    }
    for shape in opts.shapes.split(","):

        def save(partial: dict[str, Any], shape: str = shape) -> None:
            report["shapes"][shape] = partial
            write(report, opts.out)

        save(run_shape(opts, shape, log, save))
    return report


def write(report: dict[str, Any], out: str) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(report, indent=1, default=str))


def merge(paths: Sequence[str]) -> dict[str, Any]:
    """Several runs (each one device call) side by side, whole."""
    return {"runs": [json.loads(Path(path).read_text()) for path in paths]}


def first_result_s(run: dict[str, Any]) -> float | None:
    """Seconds from the upload's first byte to the first finished shard (from the timeline)."""
    return next((t for t, done in run.get("timeline", []) if done > 0), None)


def steady(run: dict[str, Any]) -> float | None:
    """Docs/s once results flow: the job's documents over its time after the first shard."""
    first = first_result_s(run)
    return round(run["docs"] / (run["seconds"] - first), 1) if first else None


ROLES_SHOWN = ("api", "worker", "engine", "postgres", "redis", "moto", "beat")


def shape_row(shape: str, r: dict[str, Any]) -> str:
    b, a = r.get("b") or {}, r.get("a") or {}
    per_k = b.get("cpu_s_per_1000_docs", {})
    verdict = b.get("verdict", {})
    checked = "all" if verdict.get("clean") else f"{verdict}"
    feed = r.get("feed", {})
    return (
        f"| {shape} | {r.get('docs')} | {a.get('docs_per_s', '-')} | "
        f"{b.get('docs_per_s', '-')} | {r.get('ratio_b_over_a', '-')} | {b.get('upload_s', '-')} | "
        f"{first_result_s(b) if b else '-'} | {steady(b) if b else '-'} | {checked} | "
        + " | ".join(str(per_k.get(role, "-")) for role in ROLES_SHOWN)
        + f" | {feed.get('cores_per_gpu', '-')} | {feed.get('gpus_fed', '-')} |"
    )


def fault_rows(shape: str, r: dict[str, Any]) -> list[str]:
    rows, b = [], r.get("b")
    for kind in ("kill-worker", "restart-redis"):
        if f := r.get(kind):
            v, info = f["verdict"], f.get("fault") or {}
            extra = round(f["seconds"] - b["seconds"], 1) if b else "-"
            rows.append(
                f"| {shape} | {kind} | {f['docs']} | {info.get('done_at_fault', '-')} | "
                f"{f['seconds']} | {extra} | {info.get('recovered_s', '-')} | "
                f"{info.get('engine_restart_s', '-')} | "
                f"{v['lost']} | {v['duplicated']} | {v['unexpected']} | {v['stuck']} |"
            )
    return rows


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def load_rows(shape: str, r: dict[str, Any]) -> list[str]:
    load = r.get("load") or {}
    rows = []
    for lv in load.get("levels", []):
        spill = round(lv["throughput_docs_per_s"] - lv["gpu_docs_per_s"], 1)
        rows.append(
            f"| {shape} | {lv['multiplier']:g}x {load['peak_docs_per_s']:.0f} | "
            f"{lv['offered_docs_per_s']} | {lv['jobs']} | {lv['docs']} | {lv['completion_s']} | "
            f"{lv['throughput_docs_per_s']} | {lv['gpu_docs_per_s']} | {spill} | "
            f"{lv['peak_queue_docs']} | {lv['gpu_idle_while_backlog']:.1%} | "
            f"{lv['spill_share']:.1%} | {_share(lv.get('spill_needed_share'))} | "
            f"{lv['deadline_misses']}/{lv['jobs']} | "
            f"{lv.get('feasible_misses', '-')}/{lv.get('feasible_jobs', '-')} | {lv['failed']} | "
            f"{lv['lost']} |"
        )
    return rows


def table(report: dict[str, Any]) -> str:
    head = (
        "| shape | docs | (a) docs/s | (b) docs/s | (b)/(a) | upload s | first result s | "
        "(b) docs/s after it | checked in Postgres + S3 | "
        + " | ".join(ROLES_SHOWN)
        + " | cores/GPU | GPUs fed |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    faults: list[str] = []
    loads: list[str] = []
    for run in report.get("runs") or [report]:
        for shape, r in run["shapes"].items():
            lines.append(shape_row(shape, r))
            faults += fault_rows(shape, r)
            loads += load_rows(shape, r)
    if faults:
        lines += [
            "",
            "| shape | fault | docs | done at the fault | job s | s more than (b) | "
            "progress again after s | engine up after s | lost | duplicated | unexpected | stuck |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
            *faults,
        ]
    if loads:
        lines += [
            "",
            "| shape | load x peak | offered docs/s | jobs | docs | done in s | docs/s | GPU | "
            "spill | peak queue | GPU idle while work waits | spill share | spill the deadlines "
            "needed | deadline misses | missed / feasible | failed | lost |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
            *loads,
        ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    if opts.merge:
        report = merge(opts.merge)
        write(report, opts.out)
        plot(report, Path(opts.out).with_suffix(".png"))
        plot_load(report, Path(opts.out).with_name(Path(opts.out).stem + "-load.png"))
    else:
        report = run(opts)
    print(table(report), flush=True)
    print(f"JSON: {opts.out}", flush=True)
    return 0
