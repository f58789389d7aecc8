"""The command line: arguments, the run over every shape, the merge of reports, and the child
phases the orchestrator starts (`--child KIND SPEC`)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench import gpu
from bench.gpu.config import ENGINES, H100_BF16_FLOPS, MAX_MODEL_LEN, SEED
from bench.gpu.docs import child_build
from bench.gpu.phases import bench_shape
from bench.gpu.postroom_path import child_engine
from bench.gpu.raw import child_raw
from bench.gpu.report import merge, table, write_report
from bench.gpu.runbatch import child_runbatch

ROOT = Path(__file__).resolve().parents[2]


def child_all(cfg: dict[str, Any]) -> dict[str, Any]:
    """Every phase in one process (a quick check on a small machine): the model, (a) with the
    engine in-process, then one AsyncLLM for (b), (d) and (c) (the batch runner's run_batch()
    on the adapter's engine: same engine, its own front end)."""
    out: dict[str, Any] = {"build": child_build(cfg)}
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # LLM only; AsyncLLM is always a process
    out["raw"] = child_raw(cfg)
    import gc

    gc.collect()
    out["engine"] = child_engine({**cfg, "runbatch_on_engine": True})
    out["runbatch"] = out["engine"].pop("runbatch")
    return out


CHILDREN = {
    "build": child_build,
    "raw": child_raw,
    "engine": child_engine,
    "runbatch": child_runbatch,
    "all": child_all,
}


def run_bench(opts: argparse.Namespace) -> dict[str, Any]:
    """The core: every shape, every mode; returns the report (also written to opts.out)."""
    started = time.time()
    deadline = started + opts.budget_s
    Path(opts.work_dir).mkdir(parents=True, exist_ok=True)
    log_path = Path(opts.log or Path(opts.work_dir) / "bench.log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_file = log_path.open("a")

    def log(line: str, echo: bool = True) -> None:
        stamped = f"{time.strftime('%H:%M:%S')} {line}"
        log_file.write(stamped + "\n")
        log_file.flush()
        if echo:
            print(stamped, flush=True)

    report: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "device": opts.device,
        "settings": {
            "docs": opts.docs,
            "choice_docs": opts.choice_docs,
            "warm_docs": opts.warm_docs,
            "max_model_len": MAX_MODEL_LEN,
            "engines": {n: asdict(ENGINES[n]) for n in opts.engines.split(",")},
            "primary": opts.primary,
            "passes": opts.passes,
            "seed": SEED,
            "peak_flops": H100_BF16_FLOPS,
        },
        "shapes": {},
    }

    def checkpoint() -> None:
        report["elapsed_s"] = round(time.time() - started, 1)
        write_report(report, opts)

    opts.checkpoint = checkpoint
    for shape in opts.shapes.split(","):
        report["shapes"][shape] = {"shape": shape, "modes": {}}
        report["shapes"][shape] = bench_shape(shape, opts, deadline, log)
        checkpoint()
    checkpoint()
    log_file.close()
    return report


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=gpu.__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--shapes", default="0.5b,1.5b", help="tiny, 0.5b, 1.5b (comma-separated)")
    p.add_argument("--docs", type=int, default=8000, help="timed documents per pass")
    p.add_argument("--choice-docs", type=int, default=None, help="(d) documents (docs/2)")
    p.add_argument("--warm-docs", type=int, default=512, help="warm-up documents (others)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu.json"))
    p.add_argument("--work-dir", default="/tmp/postroom-bench")
    p.add_argument("--log", default=None, help="full log, children included (work dir)")
    p.add_argument("--modes", default="a,b,c,d")
    p.add_argument("--engines", default="t32k", help=f"of {', '.join(ENGINES)}")
    p.add_argument("--primary", default="t32k", help="engine settings (a), (b), (c), (d) share")
    p.add_argument(
        "--passes",
        default="raw,8x256x4,asyncllm:4",
        help="timed passes on the primary engine (see parse_passes); (b) is reported at the\n"
        "first classify pass (threads x shard x in-flight factor), median over repeats",
    )
    p.add_argument("--other-passes", default="8x256x4", help="on the other --engines")
    p.add_argument(
        "--repeats", type=int, default=3, help="(a) passes; --paired: the --passes sequence"
    )
    p.add_argument("--prefix-tokens", type=int, default=200)
    p.add_argument("--budget-s", type=float, default=900, help="hard time budget, all shapes")
    p.add_argument("--pass-reserve-s", type=float, default=20)
    p.add_argument("--min-phase", default="tiny=20,0.5b=75,1.5b=120", help="skip if less left")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--kv-cache-bytes", type=int, default=512 * 1024 * 1024, help="CPU only")
    p.add_argument("--verbose", action="store_true", help="echo the children's output")
    p.add_argument(
        "--paired",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="(a) and (b) on the same GPU at once (half the memory each), passes interleaved;\n"
        "--no-paired: (a) in its own process after (b)",
    )
    p.add_argument(
        "--single-process",
        action="store_true",
        help="one process, one AsyncLLM for (b), (c), (d) (quick check on a small machine)",
    )
    p.add_argument(
        "--scaling",
        type=int,
        default=0,
        help="N GPUs: one engine vs N independent engines vs one tensor-parallel-N engine\n"
        "(bench/gpu/scaling.py), instead of the modes",
    )
    p.add_argument("--child", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    p.add_argument("--merge", nargs="+", metavar="JSON", help="merge reports, print the table")
    opts = p.parse_args(argv)
    if opts.choice_docs is None:
        opts.choice_docs = max(1, opts.docs // 2)
    opts.min_phase_s = {
        k: float(v) for k, v in (item.split("=") for item in opts.min_phase.split(","))
    }
    opts.checkpoint = lambda: None
    return opts


def _scaling(opts: argparse.Namespace) -> int:
    from bench.gpu import scaling

    deadline = time.time() + opts.budget_s
    Path(opts.work_dir).mkdir(parents=True, exist_ok=True)

    def log(line: str, echo: bool = True) -> None:
        if echo:
            print(f"{time.strftime('%H:%M:%S')} {line}", flush=True)

    results = {
        shape: scaling.run_scaling(shape, opts, deadline, log) for shape in opts.shapes.split(",")
    }
    report = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "scaling": results}
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.out).write_text(json.dumps(report, indent=2))
    print(scaling.table(results), flush=True)
    print(f"JSON: {opts.out}", flush=True)
    return 0


@contextlib.contextmanager
def _child_result(path: str) -> Iterator[dict[str, Any]]:
    holder: dict[str, Any] = {}
    yield holder
    Path(path).write_text(json.dumps(holder["result"], default=str))


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    if opts.child:
        kind, spec_path = opts.child
        cfg = json.loads(Path(spec_path).read_text())
        with _child_result(cfg["result_path"]) as holder:
            holder["result"] = CHILDREN[kind](cfg)
        return 0
    if opts.merge:
        report = merge(opts.merge)
        write_report(report, opts)
        print(table(report))
        return 0
    if opts.scaling:
        return _scaling(opts)
    report = run_bench(opts)
    print(table(report), flush=True)
    print(f"JSON: {opts.out}", flush=True)
    return 0
