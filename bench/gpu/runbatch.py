"""(c) vLLM's OpenAI batch runner (`vllm.entrypoints.openai.run_batch`) over OpenAI batch JSONL
of the same prompts (child "runbatch", or on (b)'s engine with --single-process)."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.gpu.config import MAX_MODEL_LEN, EngineCfg, engine_kwargs, vllm_env, vllm_version
from bench.gpu.docs import job_layout, load_docs, prompts_of

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
