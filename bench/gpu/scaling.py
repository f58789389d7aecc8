"""Several GPUs, engine level: one engine on one GPU, N independent engines (one per GPU, as
`postroom worker --gpus all` runs them) and one tensor-parallel engine over the same N GPUs, on
the same documents and engine settings as (a) (`LLM.generate`, bench/gpu/raw.py).

The N independent engines start together and time their passes only once every one of them is
warm (a barrier of files in the work dir), so their docs/s add up. On the CPU the run checks the
plumbing with independent engines only (vLLM's CPU build has no tensor parallelism over GPUs).
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from bench.gpu.config import ENGINES
from bench.gpu.phases import Log, run_child, shape_base


def _rate(out: dict[str, Any]) -> float | None:
    passes = [p for p in out.get("passes", []) if p.get("wall_s")]
    if not passes:
        return None
    return statistics.median(p["docs"] / p["wall_s"] for p in passes)


def _engines_at_once(
    cfg: dict[str, Any], groups: list[str], *, name: str, timeout: float, log: Log
) -> list[dict[str, Any]]:
    """One raw child per GPU group, started together, timed after a shared barrier."""
    barrier = Path(cfg["work_dir"]) / f"barrier-{name}"
    barrier.mkdir(parents=True, exist_ok=True)
    outs: list[dict[str, Any]] = [{} for _ in groups]

    def one(i: int, devices: str) -> None:
        child = {
            **cfg,
            "cuda_visible_devices": devices,
            "barrier_dir": str(barrier),
            "barrier_n": len(groups),
        }
        outs[i] = run_child("raw", child, timeout=timeout, log=log)

    threads = [threading.Thread(target=one, args=(i, g)) for i, g in enumerate(groups)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outs


def run_scaling(shape: str, opts: argparse.Namespace, deadline: float, log: Log) -> dict[str, Any]:
    gpus = opts.scaling
    base = shape_base(shape, opts, deadline)
    timeout = max(60.0, deadline - time.time())
    built = run_child("build", base, timeout=timeout, log=log)
    if "error" in built:
        return {"error": f"build: {built['error']}"}
    engine = ENGINES[opts.primary]
    cfg = {**base, "engine": asdict(engine)}
    one = _engines_at_once(cfg, ["0"], name="one", timeout=timeout, log=log)[0]
    many = _engines_at_once(
        cfg, [str(g) for g in range(gpus)], name="independent", timeout=timeout, log=log
    )
    result: dict[str, Any] = {
        "gpus": gpus,
        "engine": engine.name,
        "one_engine_docs_per_s": _rate(one),
        "independent_docs_per_s": [_rate(out) for out in many],
        "errors": [out["error"] for out in [one, *many] if "error" in out],
    }
    rates = [r for r in result["independent_docs_per_s"] if r]
    result["independent_total_docs_per_s"] = sum(rates) if len(rates) == gpus else None
    if result["one_engine_docs_per_s"] and result["independent_total_docs_per_s"]:
        result["independent_scaling"] = (
            result["independent_total_docs_per_s"] / result["one_engine_docs_per_s"]
        )
    if opts.device == "cuda":
        tp = replace(engine, options={**engine.options, "tensor_parallel_size": gpus})
        tp_out = _engines_at_once(
            {**base, "engine": asdict(tp)},
            [",".join(str(g) for g in range(gpus))],
            name="tensor-parallel",
            timeout=timeout,
            log=log,
        )[0]
        result["tensor_parallel_docs_per_s"] = _rate(tp_out)
        if "error" in tp_out:
            result["errors"].append(tp_out["error"])
    else:
        result["tensor_parallel_docs_per_s"] = None
        result["note"] = "tensor parallelism needs GPUs: not run on the CPU"
    log(f"scaling {shape}: {result}")
    return result


def table(results: dict[str, dict[str, Any]]) -> str:
    lines = [
        "shape  GPUs  1 engine  N engines (sum)  scaling  1 TP-N engine  TP-N / N engines",
    ]
    for shape, r in results.items():
        one, many, tp = (
            r.get("one_engine_docs_per_s"),
            r.get("independent_total_docs_per_s"),
            r.get("tensor_parallel_docs_per_s"),
        )

        def f(x: float | None) -> str:
            return f"{x:,.1f}" if x else "-"

        ratio = f"{tp / many:.2f}" if tp and many else "-"
        scale = f"{r['independent_scaling']:.2f}x" if r.get("independent_scaling") else "-"
        cells = f"{f(one):>8}  {f(many):>15}  {scale:>7}  {f(tp):>13}  {ratio:>16}"
        lines.append(f"{shape:<6} {r.get('gpus', '-'):>4}  {cells}")
    return "\n".join(lines)
