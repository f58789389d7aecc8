"""One shape on the whole stack: the model and documents of bench/gpu (child "build"), (a) raw
`LLM.generate` on them (child "raw"), then (b) the same documents streamed through the API of a
`GpuStack` until the job is completed, every result checked in Postgres and S3; optionally a
fault mid-job (kill -9 of the worker, or an empty Redis restart) with the time to recover."""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.gpu.config import ENGINES, MAX_MODEL_LEN
from bench.gpu.phases import run_child
from bench.gpu.stack.load import run_load, spill_settings
from bench.gpu.stack.services import FINAL, ROLES, GpuStack
from postroom.settings import ModelSpec, Settings
from postroom.storage import Storage
from postroom_cli.local import free_port
from postroom_cli.standin import StandinServer
from tests.faults.invariants import check

Log = Callable[..., None]
ALIAS = "bench"


def child_cfg(opts: argparse.Namespace, shape: str) -> dict[str, Any]:
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
        "prefix_tokens": 200,
        "kv_cache_bytes": opts.kv_cache_bytes,
        "gpu_memory_utilization": opts.gpu_memory_utilization,
        "repeats": opts.raw_repeats,
        "from_text": True,
        "engine": asdict(ENGINES[opts.engine]),
        "verbose": opts.verbose,
    }


def stack_settings(opts: argparse.Namespace, cfg: dict[str, Any]) -> Settings:
    """The worker's engine gets (a)'s settings (bench/gpu/config.engine_kwargs)."""
    engine = ENGINES[opts.engine]
    spec = ModelSpec(path=cfg["model_dir"], mode="generative", revision=f"random-{cfg['shape']}")
    return Settings(
        models={ALIAS: spec},
        model=ALIAS,
        engine_device=opts.device,
        engine_max_model_len=MAX_MODEL_LEN,
        engine_max_num_seqs=engine.max_num_seqs,
        engine_max_num_batched_tokens=engine.max_num_batched_tokens,
        engine_enforce_eager="true" if engine.enforce_eager else "false",
        engine_gpu_memory_utilization=opts.gpu_memory_utilization,
        engine_kv_cache_bytes=opts.kv_cache_bytes,
        engine_inflight_factor=opts.inflight_factor,
        engine_dtype="bfloat16",
        doc_max_tokens=MAX_MODEL_LEN,
        shard_size=opts.shard_size,
        worker_concurrency=opts.concurrency,
        lease_seconds=opts.lease_seconds,
    )


def write_jsonl(path: Path, docs: list[dict[str, Any]]) -> None:
    with path.open("w") as f:
        for doc in docs:
            f.write(json.dumps({"id": doc["id"], "text": doc["text"]}) + "\n")


class JobRun:
    """Upload a JSONL file, follow the job to its end (sampling progress), make a fault."""

    def __init__(
        self, stack: GpuStack, data: dict[str, Any], log: Log, timeout: float = 3600
    ) -> None:
        self.stack, self.data, self.log, self.timeout = stack, data, log, timeout
        # The engine's batch: its setting, or what "0 = auto" picks (postroom.settings).
        gpu = stack.settings.engine_device != "cpu"
        self.max_num_seqs = stack.settings.engine_max_num_seqs or (512 if gpu else 128)
        self.params = {
            "labels": json.dumps(data["labels"]),
            "instructions": data["instructions"],
            "model": ALIAS,
        }

    def run(self, path: Path, docs: int, fault: str = "", fault_at: float = 0.3) -> dict[str, Any]:
        stack = self.stack
        cpu0, t0 = stack.cpu(), time.time()
        job = stack.client.upload(path, self.params)
        upload_s = time.time() - t0
        timeline: list[tuple[float, int]] = []
        inflight: list[tuple[float, int | None]] = []
        faulted: dict[str, Any] = {}
        while (job := stack.client.job(job["id"]))["status"] not in FINAL:
            done = job["counts"]["succeeded"] + job["counts"]["failed"]
            timeline.append((round(time.time() - t0, 2), done))
            if len(timeline) % 4 == 1:  # a scrape costs the worker's GIL ~5 ms: once a second
                inflight.append((round(time.time() - t0, 2), stack.inflight()))
            if fault and not faulted and done >= fault_at * docs:
                faulted = self.fault(fault, done)
            if faulted and "recovered_s" not in faulted and done > faulted["done_at_fault"]:
                faulted["recovered_s"] = round(time.time() - faulted["at"], 1)
            if time.time() - t0 > self.timeout:
                raise TimeoutError(
                    f"job {job['id']} not done after {self.timeout:.0f}s: {job['counts']}; "
                    f"fault {faulted}\n{stack.log_tails()}"
                )
            time.sleep(0.25)
        cpu1 = stack.cpu()
        seconds = datetime.fromisoformat(job["finished_at"]).timestamp() - t0
        if faulted:
            faulted.pop("at")
            faulted.pop("thread", None)
        return {
            "job_id": job["id"],
            "status": job["status"],
            "counts": job["counts"],
            "docs": docs,
            "seconds": round(seconds, 2),
            "docs_per_s": round(docs / seconds, 1),
            "upload_s": round(upload_s, 2),
            "cpu_s": {r: round(cpu1[r] - cpu0[r], 2) for r in ROLES},
            "timeline": timeline,
            "inflight": inflight,
            "inflight_summary": inflight_summary(inflight, self.max_num_seqs),
            "fault": faulted or None,
        }

    def fault(self, kind: str, done: int) -> dict[str, Any]:
        stack = self.stack
        self.log(f"   fault {kind} at {done} documents done")
        started = time.time()
        out: dict[str, Any] = {"kind": kind, "at": started, "done_at_fault": done}
        if kind == "kill-worker":
            stack.kill_worker()
            # Restarted at once, as compose's `restart: unless-stopped`; the engine's start is real.
            stack.start_worker(wait=False)
            thread = threading.Thread(target=self._engine_up, args=(out,), daemon=True)
            thread.start()
        elif kind == "restart-redis":
            stack.restart_redis_empty()
            out["redis_back_s"] = round(time.time() - started, 2)
        else:
            raise ValueError(f"unknown fault {kind!r}: kill-worker or restart-redis")
        return out

    def _engine_up(self, out: dict[str, Any]) -> None:
        self.stack.wait_engine()
        out["engine_restart_s"] = round(time.time() - out["at"], 1)


def worker_variants(items: list[str]) -> list[dict[str, str]]:
    """`--worker-env` items (`K=V,K=V`, or empty for the stack's settings as they are) as env
    dicts; one (b) each, the first one's is the (b) of the ratio."""
    return [dict(kv.split("=", 1) for kv in item.split(",") if kv) for item in items] or [{}]


def inflight_summary(samples: list[tuple[float, int | None]], batch: int) -> dict[str, Any]:
    """How full the worker kept its engine while the job ran: the share of samples (about one
    a second) with fewer requests in the engine than one full batch (max_num_seqs)."""
    seen = [n for _, n in samples if n is not None]
    if not seen:
        return {"samples": 0}
    return {
        "samples": len(seen),
        "median": statistics.median(seen),
        "below_batch_share": round(sum(1 for n in seen if n < batch) / len(seen), 3),
        "batch": batch,
    }


def verify(stack: GpuStack, job_id: str, ids: list[str]) -> dict[str, Any]:
    """Every document's result row in Postgres and its line in S3, exactly once."""
    verdict = check(
        sessions=stack.sessions,
        storage=Storage(stack.settings),
        expected={uuid.UUID(job_id): set(ids)},
        lease_seconds=stack.settings.lease_seconds,
    )
    counts = verdict.counts()
    counts["clean"] = verdict.clean
    counts["examples"] = (verdict.lost + verdict.duplicated + verdict.unexpected + verdict.stuck)[
        :5
    ]
    return counts


def raw_summary(raw: dict[str, Any]) -> dict[str, Any]:
    if "error" in raw:
        return raw
    ids = [p for p in raw["passes"] if not p["config"].get("from_text")]
    text = [p for p in raw["passes"] if p["config"].get("from_text")]
    rates = [p["docs"] / p["wall_s"] for p in ids]
    text_rates = [p["docs"] / p["wall_s"] for p in text]
    return {
        "docs_per_s": round(statistics.median(rates), 1),
        "passes_docs_per_s": [round(r, 1) for r in rates],
        # Timed from the text: one batch tokenisation on the clock, as (b) tokenises in the worker.
        "from_text_docs_per_s": round(statistics.median(text_rates), 1) if text_rates else None,
        "from_text_passes_docs_per_s": [round(r, 1) for r in text_rates],
        "engine_start_s": round(raw["engine_start_s"], 1),
        "cpu_engine_core": [p.get("cpu_engine_core") for p in raw["passes"]],
        "cpu_process": [p.get("cpu_process") for p in raw["passes"]],
        "vllm": raw.get("vllm"),
    }


def per_thousand(run: dict[str, Any]) -> dict[str, float]:
    return {r: round(s * 1000 / run["docs"], 2) for r, s in run["cpu_s"].items()}


def feed(run: dict[str, Any], host_cores: int) -> dict[str, Any]:
    """Cores one GPU at this rate keeps busy outside the GPU, and how many such GPUs a host's
    cores feed (its engine core included: one per GPU)."""
    per_k = per_thousand(run)
    rate = run["docs_per_s"]
    per_gpu = {
        "engine_and_worker": (per_k["engine"] + per_k["worker"]) * rate / 1000,
        "shared": sum(per_k[r] for r in ("api", "postgres", "redis", "moto", "beat")) * rate / 1000,
    }
    cores = per_gpu["engine_and_worker"] + per_gpu["shared"]
    return {
        "cores_per_gpu": round(cores, 2),
        "cores_per_gpu_split": {k: round(v, 2) for k, v in per_gpu.items()},
        "host_cores": host_cores,
        "gpus_fed": round(host_cores / cores, 1) if cores else None,
    }


def run_shape(
    opts: argparse.Namespace, shape: str, log: Log, save: Callable[[dict[str, Any]], None]
) -> dict[str, Any]:
    """The shape's result; `save(partial)` after each phase (a run cut short keeps those)."""
    cfg = child_cfg(opts, shape)
    out: dict[str, Any] = {"shape": shape, "docs": opts.docs, "engine": cfg["engine"]}
    log(f"== {shape}: the model and {opts.docs} documents")
    out["build"] = run_child("build", cfg, timeout=900, log=log)
    if "error" in out["build"]:
        return out
    data = json.loads(Path(cfg["docs_path"]).read_text())
    if opts.raw_repeats:
        log(f"== {shape}: (a) raw LLM.generate x{opts.raw_repeats}")
        out["a"] = raw_summary(run_child("raw", cfg, timeout=1200, log=log))
        log(f"   (a) {out['a']}")
        save(out)
    work = Path(cfg["work_dir"]) / "stack"
    worker_args = ["--concurrency", str(opts.concurrency)]
    settings = stack_settings(opts, cfg)
    standin = None
    if opts.load:
        standin = StandinServer(free_port()).start()
        standin.set_faults(latency=opts.load_latency)
        settings = settings.model_copy(update=spill_settings(standin.url))
    stack = GpuStack(work, settings, worker_args=worker_args, spill=bool(opts.load))
    started = time.monotonic()
    try:
        log(f"== {shape}: (b) the stack (logs {stack.logs})")
        stack.start()
        out["stack_start_s"] = round(time.monotonic() - started, 1)
        runner = JobRun(stack, data, log, timeout=opts.job_timeout)
        warm_path, path = work / "warm.jsonl", work / "docs.jsonl"
        write_jsonl(warm_path, data["warm"])
        write_jsonl(path, data["docs"])
        warm = runner.run(warm_path, len(data["warm"]))
        out["warm"] = {k: warm[k] for k in ("docs", "seconds", "status")}
        ids = [d["id"] for d in data["docs"]]

        def through_api(name: str, fault: str = "") -> dict[str, Any]:
            log(f"   {name}: {len(ids)} documents through the API")
            result = runner.run(path, len(ids), fault=fault, fault_at=opts.fault_at)
            result["verdict"] = verify(stack, result["job_id"], ids)
            result["cpu_s_per_1000_docs"] = per_thousand(result)
            result["worker_env"] = dict(stack.worker_env)
            log(f"   {name}: {result['docs_per_s']} docs/s, verdict {result['verdict']}")
            return result

        for number, env in enumerate(worker_variants(opts.worker_env)):
            if number:  # each variant on a fresh worker (its engine started again), warmed up
                log(f"   worker again with {env}")
                stack.restart_worker(env)
                runner.run(warm_path, len(data["warm"]))
            result = through_api("b" if not number else f"b{number + 1}")
            if not number:
                out["b"] = result
            else:
                out.setdefault("b_variants", []).append(result)
            save(out)
        for fault in filter(None, opts.faults.split(",")):
            out[fault] = through_api(fault, fault)
            save(out)
        if opts.load:

            def save_load(partial: dict[str, Any]) -> None:
                out["load"] = partial
                save(out)

            out["load"] = run_load(stack, opts, work, log, save_load)
    finally:
        stack.stop()
        stack.remove()
        if standin is not None:
            standin.stop()
    b, a = out.get("b"), out.get("a", {})
    if b and a.get("docs_per_s"):
        out["ratio_b_over_a"] = round(b["docs_per_s"] / a["docs_per_s"], 3)
        if a.get("from_text_docs_per_s"):
            out["ratio_b_over_a_from_text"] = round(b["docs_per_s"] / a["from_text_docs_per_s"], 3)
        for variant in out.get("b_variants", []):
            variant["ratio_b_over_a"] = round(variant["docs_per_s"] / a["docs_per_s"], 3)
    if b:
        out["feed"] = feed(b, opts.host_cores)
    return out
