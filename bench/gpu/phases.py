"""One shape's run: its phases, each in a fresh child process of bench/gpu/run.py, and their
results absorbed into the shape's part of the report."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.gpu.config import ENGINES, EngineCfg, main_classify_name
from bench.gpu.report import agreement, derive, median_pass, mode_summary, ratios

# The children re-run the entry script, which puts the repository root on sys.path.
ENTRY = Path(__file__).resolve().with_name("run.py")

Log = Callable[..., None]


def run_child(kind: str, cfg: dict[str, Any], *, timeout: float, log: Log) -> dict[str, Any]:
    """Run one phase in a fresh process; its stdout/stderr go to the log; returns its JSON."""
    work = Path(cfg["work_dir"])
    spec_path = work / f"{kind}-{uuid.uuid4().hex[:8]}.json"
    result_path = spec_path.with_suffix(".out.json")
    spec_path.write_text(json.dumps({**cfg, "result_path": str(result_path)}))
    cmd = [sys.executable, str(ENTRY), "--child", kind, str(spec_path)]
    started = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            log(f"  [{kind}] {line.rstrip()}", echo=cfg.get("verbose", False))

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # this child's own process group only
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        reader.join(timeout=5)
        return {"error": f"timed out after {timeout:.0f}s", "phase_s": time.monotonic() - started}
    reader.join(timeout=5)
    if rc != 0 or not result_path.exists():
        return {"error": f"exit code {rc} (see the log)", "phase_s": time.monotonic() - started}
    out: dict[str, Any] = json.loads(result_path.read_text())
    out["phase_s"] = round(time.monotonic() - started, 1)
    return out


def shape_base(shape: str, opts: argparse.Namespace, deadline: float) -> dict[str, Any]:
    """The child configuration every phase of a shape shares."""
    work = Path(opts.work_dir) / shape
    work.mkdir(parents=True, exist_ok=True)
    return {
        "shape": shape,
        "device": opts.device,
        "work_dir": str(work),
        "model_dir": str(Path(opts.work_dir) / "models" / shape),
        "docs_path": str(work / "docs.json"),
        "docs": opts.docs,
        "warm_docs": opts.warm_docs,
        "prefix_tokens": opts.prefix_tokens,
        "kv_cache_bytes": opts.kv_cache_bytes,
        "gpu_memory_utilization": opts.gpu_memory_utilization,
        "repeats": opts.repeats,
        "verbose": opts.verbose,
        "deadline": deadline,
        "pass_reserve_s": opts.pass_reserve_s,
    }


class ShapeBench:
    """Every mode of one shape: runs the phases within the deadline and builds the result."""

    def __init__(self, shape: str, opts: argparse.Namespace, deadline: float, log: Log) -> None:
        self.shape, self.opts, self.deadline, self.log = shape, opts, deadline, log
        self.base = shape_base(shape, opts, deadline)
        self.result: dict[str, Any] = {"shape": shape, "modes": {}, "engines": {}}
        self.engines = [ENGINES[name] for name in opts.engines.split(",")]
        self.primary = ENGINES[opts.primary]
        self.labels: dict[str, Any] = {}
        self.ids: list[str] = []
        self.params = 0

    def remaining(self) -> float:
        return self.deadline - time.time()

    def extra_for(self, engine: EngineCfg, paired: bool = False) -> dict[str, Any]:
        opts = self.opts
        is_primary = engine.name == self.primary.name
        util = opts.gpu_memory_utilization
        return {
            "paired": paired,
            "gpu_memory_utilization": round(util / 2, 3) if paired else util,
            "engine": asdict(engine),
            "passes": opts.passes if is_primary else opts.other_passes,
            "choice_docs": (opts.choice_docs if is_primary and "d" in opts.modes else 0),
        }

    def absorb_build(self, built: dict[str, Any]) -> bool:
        self.result["build"] = built
        self.log(f"   {json.dumps(built)}")
        if "error" in built:
            return False
        self.params = built["non_embedding_params"]
        docs = json.loads(Path(self.base["docs_path"]).read_text())["docs"]
        self.ids = [d["id"] for d in docs]
        return True

    def absorb(self, kind: str, engine: EngineCfg, out: dict[str, Any]) -> None:
        """One phase's output into the result; the report is written after each."""
        if kind == "engine":
            self.absorb_engine(engine, out)
        else:
            self.absorb_single(kind, engine, out)
        modes, labels = self.result["modes"], self.labels
        for mode in ("b", "c"):
            if mode in modes and labels.get("a") and labels.get(mode):
                modes[mode]["label_agreement_with_a"] = agreement(
                    labels["a"], labels[mode], self.ids
                )
        self.opts.checkpoint()

    def absorb_single(self, kind: str, engine: EngineCfg, out: dict[str, Any]) -> None:
        """(a) or (c) from its own process."""
        mode = "a" if kind == "raw" else "c"
        passes = [derive(p, self.params) for p in out.get("passes", [])]
        self.labels[mode] = out.get("labels") or next(
            (p.get("labels") for p in out.get("passes", [])), None
        )
        entry = {k: v for k, v in out.items() if k not in ("passes", "labels")}
        entry["passes"] = passes
        chosen = median_pass(passes, "raw" if mode == "a" else "classify")
        self.result["modes"][mode] = mode_summary(entry, chosen, engine)

    def absorb_engine(self, engine: EngineCfg, out: dict[str, Any]) -> None:
        """An "engine" child: its passes per engine; on the primary engine (b), (d) and, when
        paired, (a)."""
        labels = self.labels
        passes = [derive(p, self.params) for p in out.get("passes", [])]
        raw_out = out.get("raw")
        if raw_out:  # paired: (a) ran in this process, interleaved with (b)
            labels["a"] = raw_out.get("labels")
        for p, raw in zip(passes, out.get("passes", []), strict=True):
            if raw.get("labels") and labels.get("a"):
                p["agree_with_a"] = agreement(labels["a"], raw["labels"], self.ids)
        skip = ("passes", "choice", "runbatch", "raw")
        entry = {
            **{k: v for k, v in out.items() if k not in skip},
            "config": asdict(engine),
            "passes": passes,
        }
        self.result["engines"][engine.name] = entry
        if engine.name == self.primary.name:
            self.absorb_primary(engine, out, entry)

    def absorb_primary(self, engine: EngineCfg, out: dict[str, Any], entry: dict[str, Any]) -> None:
        modes, passes = self.result["modes"], entry["passes"]
        main = main_classify_name(self.opts.passes)
        chosen = median_pass(passes, "classify", main)
        if chosen:
            self.labels["b"] = next(
                (r["labels"] for r in out["passes"] if r.get("name") == main), None
            )
        modes["b"] = mode_summary(entry, chosen, engine)
        best = max(
            (p for p in passes if (p.get("config") or {}).get("kind") == "classify"),
            key=lambda p: p.get("docs_per_s", 0),
            default=None,
        )
        if best:
            modes["b"]["best_pass"] = {"name": best["name"], "docs_per_s": best.get("docs_per_s")}
        raw_out = out.get("raw")
        if raw_out:
            a_entry = {**entry, "engine_start_s": raw_out.get("engine_start_s")}
            modes["a"] = mode_summary(a_entry, median_pass(passes, "raw"), engine)
            modes["a"]["paired_with_b"] = True
            modes["b"]["paired_with_a"] = True
        choice = [derive(p, self.params) for p in out.get("choice", [])]
        if "d" in self.opts.modes:
            modes["d"] = mode_summary(entry, choice[0] if choice else None, engine)
            if choice and "docs" in choice[0]:
                d, n = modes["d"], max(choice[0]["docs"], 1)
                d["valid_label_rate"] = round(choice[0]["ok"] / n, 4)
                d["tokens_out_per_doc"] = round(choice[0]["tokens_out"] / n, 2)

    def run(self) -> dict[str, Any]:
        if self.opts.single_process:
            return self.run_single_process()
        self.log(f"== {self.shape}: building the model and {self.opts.docs} documents")
        built = run_child("build", self.base, timeout=self.remaining(), log=self.log)
        if not self.absorb_build(built):
            return self.result
        for kind, engine in self.phase_order():
            self.run_phase(kind, engine)
        self.result["ratios"] = ratios(self.result["modes"])
        return self.result

    def run_single_process(self) -> dict[str, Any]:
        result, primary = self.result, self.primary
        self.log(f"== {self.shape}: every phase in one process ({self.remaining():.0f}s left)")
        cfg = {**self.base, **self.extra_for(primary)}
        out = run_child("all", cfg, timeout=self.remaining(), log=self.log)
        if "error" in out:
            result["error"] = out["error"]
            return result
        if self.absorb_build(out["build"]):
            self.absorb("raw", primary, out["raw"])
            self.absorb("engine", primary, out["engine"])
            self.absorb("runbatch", primary, {**out["runbatch"], "engine_start_s": None})
            result["modes"]["c"]["shared_engine"] = "ran on the (b) engine"
        result["ratios"] = ratios(result["modes"])
        return result

    def phase_order(self) -> list[tuple[str, EngineCfg]]:
        opts, primary = self.opts, self.primary
        order: list[tuple[str, EngineCfg]] = []
        if opts.paired:
            order.append(("paired", primary))
        else:
            if "b" in opts.modes or "d" in opts.modes:
                order.append(("engine", primary))
            if "a" in opts.modes:
                order.append(("raw", primary))
        if "c" in opts.modes:
            order.append(("runbatch", primary))
        if "b" in opts.modes:
            order += [("engine", e) for e in self.engines if e.name != primary.name]
        return order

    def run_phase(self, kind: str, engine: EngineCfg) -> None:
        log, remaining = self.log, self.remaining
        child = "engine" if kind == "paired" else kind
        need = self.opts.min_phase_s.get(self.shape, 120)
        if remaining() < need:
            log(f"   skip {kind} {engine.name}: {remaining():.0f}s left < {need:.0f}s")
            out: dict[str, Any] = {"skipped": f"time budget ({remaining():.0f}s left)"}
        else:
            log(f"   {kind} engine={engine.name} ({remaining():.0f}s left)")
            cfg = {**self.base, **self.extra_for(engine, paired=kind == "paired")}
            out = run_child(child, cfg, timeout=remaining() - 5, log=log)
            took = f"{out.get('phase_s')}s {out.get('error', '')}"
            log(f"   {kind} engine={engine.name} done in {took}")
        self.absorb(child, engine, out)


def bench_shape(shape: str, opts: argparse.Namespace, deadline: float, log: Log) -> dict[str, Any]:
    return ShapeBench(shape, opts, deadline, log).run()
