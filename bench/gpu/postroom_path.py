"""(b) and (d): the worker's own classes, `worker.engine.EngineAdapter` (one AsyncLLM on a
`worker.loop.LoopThread`) and `worker.classifier.EngineClassifier.classify()` from a pool of
threads, one shard each (child "engine"); with --paired, (a)'s LLM beside them on the same GPU."""

from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from bench.gpu.config import MAX_MODEL_LEN, EngineCfg, PassCfg, parse_passes, vllm_env, vllm_version
from bench.gpu.docs import load_docs
from bench.gpu.probe import Probe
from bench.gpu.raw import RawEngine
from bench.gpu.runbatch import RunBatch

if TYPE_CHECKING:
    from postroom.domain import JobSpec

Docs = list[dict[str, Any]]


def engine_settings(cfg: dict[str, Any], engine_cfg: EngineCfg) -> Any:
    """The worker's Settings for this engine configuration."""
    from postroom.settings import Settings

    return Settings(
        engine_device=cfg["device"],
        engine_max_num_seqs=engine_cfg.max_num_seqs,
        engine_max_num_batched_tokens=engine_cfg.max_num_batched_tokens,
        engine_enforce_eager="true" if engine_cfg.enforce_eager else "false",
        engine_inflight_factor=engine_cfg.inflight_factor,
        engine_max_model_len=MAX_MODEL_LEN,
        engine_gpu_memory_utilization=cfg["gpu_memory_utilization"],
        engine_kv_cache_bytes=cfg["kv_cache_bytes"],
        engine_dtype="bfloat16",
        doc_max_tokens=MAX_MODEL_LEN,
    )


class EngineBench:
    """One started EngineAdapter + EngineClassifier, and the timed passes run on them."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        from postroom.domain import Label
        from postroom.settings import ModelSpec
        from worker.classifier import EngineClassifier
        from worker.engine import EngineAdapter
        from worker.loop import LoopThread

        vllm_env(cfg["device"])
        import vllm  # noqa: F401 - imported before the clock, as in (a) and (c)
        from vllm.v1.engine.async_llm import AsyncLLM  # noqa: F401

        self.cfg = cfg
        self.engine_cfg = engine_cfg = EngineCfg(**cfg["engine"])
        self.data = data = load_docs(cfg)
        settings = engine_settings(cfg, engine_cfg)
        spec = ModelSpec(
            path=cfg["model_dir"],
            mode="generative",
            revision="bench",
            engine_options=engine_cfg.options,
        )
        self.loop = LoopThread()
        self.engine = EngineAdapter(
            alias="bench", spec=spec, path=cfg["model_dir"], settings=settings
        )
        self.loop.run(self.engine.start(), timeout=1200)
        self.classifier = EngineClassifier(
            loop=self.loop,
            engines={"bench": self.engine},
            doc_max_tokens=settings.doc_max_tokens,
            choice_max_tokens=settings.choice_max_tokens,
            embedding_temperature=settings.embedding_temperature,
            timeout=settings.engine_request_timeout_seconds,
            submit_chunk=settings.engine_submit_chunk,
        )
        self.default_chunk = settings.engine_submit_chunk
        # Paired: (a)'s LLM on the same GPU beside (b)'s engine, passes interleaved (a, b, a, b...).
        self.raw = RawEngine(cfg, engine_cfg, data) if cfg.get("paired") else None
        self.labels = [Label(**label) for label in data["labels"]]
        self.docs: Docs = data["docs"]
        self.lengths = {d["id"]: len(d["text"]) for d in self.docs}
        self.deadline = cfg["deadline"]

    def job(self, decoding: str) -> tuple[uuid.UUID, JobSpec]:
        from postroom.domain import JobSpec

        spec = JobSpec(
            labels=self.labels,
            instructions=self.data["instructions"],
            mode="generative",
            model="bench",
            revision="bench",
            decoding=decoding,  # type: ignore[arg-type]
        )
        return uuid.uuid4(), spec

    def set_inflight(self, factor: float) -> None:
        from worker.slots import FairSlots

        # What engine_inflight_factor sets at start; changed here between passes (engine idle).
        engine = self.engine
        engine.max_inflight = max(1, int(self.engine_cfg.max_num_seqs * factor))
        engine._slots = FairSlots(engine.max_inflight)

    def one_pass(self, name: str, pcfg: PassCfg, subset: Docs, decoding: str) -> dict[str, Any]:
        """One timed pass from the same start: prefix cache reset, the job's prefix primed."""
        if pcfg.kind.startswith("raw"):
            assert self.raw is not None, "a 'raw' pass needs --paired"
            return self.raw.timed(name, detokenize=pcfg.kind == "raw_detok")
        self.set_inflight(pcfg.inflight_factor)
        job_id, spec = self.job(decoding)
        self.loop.run(self.engine._llm.reset_prefix_cache(), timeout=120)
        prime = self.data["warm"][:1]
        self.classifier.classify(job_id=job_id, spec=spec, shard="prime", docs=prime)
        if not pcfg.kind.startswith("classify"):
            return self.direct_pass(name, pcfg, job_id, spec, subset)
        return self.classify_pass(name, pcfg, job_id, spec, subset)

    def classify_pass(
        self, name: str, pcfg: PassCfg, job_id: uuid.UUID, spec: JobSpec, subset: Docs
    ) -> dict[str, Any]:
        """The worker's path: classify() from a pool of threads, one shard each."""
        engine, classifier = self.engine, self.classifier
        ordered = list(subset)
        if pcfg.order == "sorted":
            ordered.sort(key=lambda d: self.lengths[d["id"]])
        shards = [ordered[i : i + pcfg.shard_size] for i in range(0, len(ordered), pcfg.shard_size)]
        before = engine.stats()
        engine.max_inflight_seen = 0
        engine.max_shards_in_flight = 0
        classifier.submit_chunk = pcfg.chunk or self.default_chunk
        with (
            Probe(self.loop._thread.ident, engine) as probe,
            ThreadPoolExecutor(pcfg.threads, thread_name_prefix="celery-like") as pool,
        ):
            futures = [
                pool.submit(
                    classifier.classify, job_id=job_id, spec=spec, shard=f"s{k}", docs=shard
                )
                for k, shard in enumerate(shards)
            ]
            results = [r for f in futures for r in f.result()]
        after = engine.stats()
        ok = [r for r in results if r.error is None]
        return {
            "name": name,
            "config": asdict(pcfg),
            "docs": len(results),
            "ok": len(ok),
            "errors_sample": sorted({str(r.error)[:60] for r in results if r.error})[:3],
            "wall_s": probe.wall,
            "prompt_tokens": after["prompt_tokens_total"] - before["prompt_tokens_total"],
            "cached_tokens": after["cached_tokens_total"] - before["cached_tokens_total"],
            "tokens_out": sum(r.tokens_out for r in results),
            "max_inflight": engine.max_inflight,
            "max_inflight_seen": engine.max_inflight_seen,
            "max_shards_in_flight": engine.max_shards_in_flight,
            **probe.summary(),
            "labels": {r.id: r.label for r in results},
        }

    def direct_pass(
        self, name: str, pcfg: PassCfg, job_id: uuid.UUID, spec: JobSpec, subset: Docs
    ) -> dict[str, Any]:
        """The adapter (or AsyncLLM alone) without threads or classifier: where time goes."""
        engine = self.engine
        layout = self.classifier._prepare(job_id, spec, engine).layout
        prompts = [
            layout.prompt(ids)[0] for ids in engine.encode_batch([d["text"] for d in subset])
        ]
        limit = engine.max_inflight
        if pcfg.kind == "adapter":
            coro = self.via_adapter(layout, prompts)
        else:
            coro = self.via_asyncllm(layout, prompts, limit, job_id)
        with Probe(self.loop._thread.ident, engine if pcfg.kind == "adapter" else None) as probe:
            outs = self.loop.run(coro, timeout=3600)
        if pcfg.kind == "adapter":
            cached = sum(o.cached_tokens for o in outs)
            ok = sum(1 for o in outs if o.logprobs)
        else:
            cached = sum(int(o.num_cached_tokens or 0) for o in outs)
            ok = sum(1 for o in outs if o.outputs and o.outputs[0].logprobs)
        return {
            "name": name,
            "config": asdict(pcfg),
            "docs": len(outs),
            "ok": ok,
            "wall_s": probe.wall,
            "prompt_tokens": sum(len(p) for p in prompts),
            "cached_tokens": cached,
            "tokens_out": len(outs),
            "max_inflight": limit,
            "max_inflight_seen": limit,
            "max_shards_in_flight": 1,
            **probe.summary(),
        }

    async def via_adapter(self, layout: Any, prompts: list[list[int]]) -> list[Any]:
        """EngineAdapter.score() for every prompt from one coroutine."""
        import asyncio

        engine = self.engine
        return list(
            await asyncio.gather(
                *(engine.score(p, layout.answer_ids, shard="direct") for p in prompts)
            )
        )

    async def via_asyncllm(
        self, layout: Any, prompts: list[list[int]], limit: int, job_id: uuid.UUID
    ) -> list[Any]:
        """AsyncLLM.generate with one shared SamplingParams under a plain semaphore."""
        import asyncio

        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(
            max_tokens=1,
            temperature=0.0,
            logprobs=len(layout.answer_ids),
            allowed_token_ids=list(layout.answer_ids),
        )
        gate = asyncio.Semaphore(limit)
        llm = self.engine._llm

        async def one(k: int, p: list[int]) -> Any:
            async with gate:
                out = None
                async for item in llm.generate(
                    TokensPrompt(prompt_token_ids=p), params, f"direct-{job_id}-{k}"
                ):
                    out = item
                return out

        return list(await asyncio.gather(*(one(k, p) for k, p in enumerate(prompts))))

    def out_of_time(self) -> bool:
        return time.time() > self.deadline - self.cfg["pass_reserve_s"]

    def timed_passes(self) -> list[dict[str, Any]]:
        """The warm-up (every batch size the passes will see, off the clock), then --passes."""
        warm_cfg = PassCfg(4, 64, self.engine_cfg.inflight_factor)
        self.one_pass("warm-up", warm_cfg, self.data["warm"], "score")
        passes = []
        sequence = parse_passes(self.cfg["passes"])
        if self.raw is None:  # (a) runs in its own process: no interleaved "raw" passes here
            sequence = [p for p in sequence if not p.kind.startswith("raw")]
        else:
            sequence = sequence * self.cfg["repeats"]
        for pcfg in sequence:
            if self.out_of_time():
                passes.append({"name": pcfg.name, "skipped": "time budget"})
                continue
            passes.append(self.one_pass(pcfg.name, pcfg, self.docs, "score"))
        return passes

    def choice_passes(self, passes: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """(d): the fastest classify pass's configuration with decoding="choice"."""
        choice: list[dict[str, Any]] = []
        if not self.cfg["choice_docs"]:
            return choice
        timed = [p for p in passes if "wall_s" in p and p["config"]["kind"] == "classify"]
        best = max(timed, key=lambda p: p["docs"] / p["wall_s"])
        pcfg = PassCfg(**best["config"])
        subset = self.docs[: self.cfg["choice_docs"]]
        if not self.out_of_time():
            warm_cfg = PassCfg(4, 64, pcfg.inflight_factor)
            self.one_pass("choice warm-up", warm_cfg, self.data["warm"], "choice")
            choice.append(self.one_pass(f"choice {pcfg.name}", pcfg, subset, "choice"))
        else:
            choice.append({"name": "choice", "skipped": "time budget"})
        return choice

    def runbatch_on_engine(self) -> dict[str, Any] | None:
        """(c) with --single-process: the batch runner's run_batch() on this engine."""
        if not self.cfg.get("runbatch_on_engine"):
            return None
        runner = RunBatch(self.cfg, self.engine_cfg)
        return runner.result(self.loop.run(runner.timed(self.engine._llm), timeout=None), None)

    def close(self) -> dict[str, Any]:
        """Shut the engine and the loop down; returns the engine's last stats."""
        stats: dict[str, Any] = self.engine.stats()
        self.engine.shutdown()
        self.loop.stop()
        return stats


def child_engine(cfg: dict[str, Any]) -> dict[str, Any]:
    bench = EngineBench(cfg)
    passes = bench.timed_passes()
    choice = bench.choice_passes(passes)
    runbatch = bench.runbatch_on_engine()
    stats = bench.close()
    raw, engine_cfg = bench.raw, bench.engine_cfg
    return {
        "raw": (
            {"engine_start_s": raw.start_s, "labels": raw.labels, "vllm": vllm_version()}
            if raw is not None
            else None
        ),
        "runbatch": runbatch,
        "engine_start_s": bench.engine.started_seconds,
        "max_inflight_default": int(engine_cfg.max_num_seqs * engine_cfg.inflight_factor),
        "passes": passes,
        "choice": choice,
        "stats": {k: v for k, v in stats.items() if k != "alias"},
        "vllm": vllm_version(),
    }
