"""Pipeline efficiency: the same documents through (a) the vLLM engine called directly and (b) the
whole pipeline (upload → API → S3 → Redis → worker → S3 + Postgres → job completed).

Both sides use the same engine options (built by worker.engine.EngineAdapter.engine_options from the
same Settings) and the same prompts (postroom.prompts.build_layout), measured in one run.

    .venv/bin/python bench/pipeline.py        # 10,000 docs, generative (tiny) + embedding
    .venv/bin/python bench/pipeline.py --docs 2000 --modes generative --repeats 3

Prints a table and writes bench/results/pipeline.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from stack import LABELS, ROOT, Stack, bench_settings

MODES = {"generative": "tiny", "embedding": "minilm"}


def make_docs(count: int, *, seed: int = 1234) -> list[dict[str, str]]:
    """Generated support-ticket-like texts, 40 to 400 words (about 50 to 600 tokens), fixed seed."""
    from worker.models import WORDS

    rng = random.Random(seed)
    return [
        {"id": f"b{i:07d}", "text": " ".join(rng.choices(WORDS, k=rng.randint(40, 400)))}
        for i in range(count)
    ]


def run_direct(settings: Any, alias: str, docs: list[dict[str, str]]) -> dict[str, Any]:
    """(a) vLLM's offline LLM with token-id prompts: the best direct way we know on this machine."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from postroom.domain import Label
    from postroom.prompts import build_layout
    from worker.engine import EngineAdapter, set_vllm_environment

    spec = settings.models[alias]
    adapter = EngineAdapter(
        alias=alias, spec=spec, path=settings.model_path(alias), settings=settings
    )
    set_vllm_environment(settings, adapter.device)
    started = time.monotonic()
    llm = LLM(**adapter.engine_options())
    start_seconds = time.monotonic() - started
    tokens = adapter.encode_batch([d["text"] for d in docs])
    labels = [Label(**label) for label in LABELS]
    if spec.mode == "embedding":
        before, after = adapter.special_tokens()
        budget = min(settings.doc_max_tokens, adapter.max_model_len - len(before) - len(after))
        prompts = [TokensPrompt(prompt_token_ids=[*before, *t[:budget], *after]) for t in tokens]
        llm.embed(prompts[:200], use_tqdm=False)  # warm-up, as the pipeline side gets one
        t0 = time.monotonic()
        outputs = llm.embed(prompts, use_tqdm=False)
        prompt_tokens = sum(len(p["prompt_token_ids"]) for p in prompts)
        assert len(outputs) == len(docs)
    else:
        layout = build_layout(
            adapter.tokenizer(),
            labels=labels,
            instructions="Classify the support ticket.",
            doc_max_tokens=settings.doc_max_tokens,
            max_model_len=adapter.max_model_len,
        )
        prompts = [TokensPrompt(prompt_token_ids=layout.prompt(t)[0]) for t in tokens]
        params = SamplingParams(
            max_tokens=1,
            temperature=0.0,
            logprobs=len(labels),
            allowed_token_ids=list(layout.answer_ids),
        )
        llm.generate(prompts[:200], params, use_tqdm=False)  # warm-up
        t0 = time.monotonic()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        prompt_tokens = sum(len(p["prompt_token_ids"]) for p in prompts)
        assert all(o.outputs[0].logprobs for o in outputs)
    seconds = time.monotonic() - t0
    del llm  # the engine core process exits with its last reference
    gc.collect()
    return {
        "seconds": seconds,
        "docs_per_s": len(docs) / seconds,
        "prompt_tokens": prompt_tokens,
        "tokens_per_s": prompt_tokens / seconds,
        "engine_start_s": start_seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=10_000)
    parser.add_argument("--modes", default="generative,embedding")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "pipeline.json")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    docs = make_docs(args.docs)
    logs = Path(tempfile.mkdtemp(prefix="postroom-bench-"))
    path = logs / "docs.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    warm = logs / "warm.jsonl"
    warm.write_text("".join(json.dumps(d) + "\n" for d in docs[:500]))
    settings = bench_settings()
    rows = []
    for mode in args.modes.split(","):
        alias = MODES[mode]
        direct = [run_direct(settings, alias, docs) for _ in range(args.repeats)]
        stack_settings = settings.model_copy(update={"model": alias, "worker_models": [alias]})
        with Stack(stack_settings, logs) as stack:
            stack.run_job(warm, len(docs[:500]), model=alias)  # warm-up: one-off costs
            pipeline = [stack.run_job(path, len(docs), model=alias) for _ in range(args.repeats)]
        for run in pipeline:
            run.pop("job")
        direct_rate = statistics.median(r["docs_per_s"] for r in direct)
        pipeline_rate = statistics.median(r["docs_per_s"] for r in pipeline)
        tokens = direct[0]["prompt_tokens"]
        rows.append(
            {
                "mode": mode,
                "model": alias,
                "docs": len(docs),
                "direct_docs_per_s": round(direct_rate, 1),
                "direct_tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in direct)),
                "pipeline_docs_per_s": round(pipeline_rate, 1),
                "pipeline_tokens_per_s": round(tokens * pipeline_rate / len(docs)),
                "ratio": round(pipeline_rate / direct_rate, 3),
                "runs": {"direct": direct, "pipeline": pipeline},
            }
        )
    print(
        f"{'mode':<11} {'model':<7} {'docs':>7} {'direct docs/s':>14} {'pipeline docs/s':>16}"
        f" {'tokens/s (b)':>13} {'(b)/(a)':>8}"
    )
    for r in rows:
        print(
            f"{r['mode']:<11} {r['model']:<7} {r['docs']:>7,} {r['direct_docs_per_s']:>14,.1f} "
            f"{r['pipeline_docs_per_s']:>16,.1f} {r['pipeline_tokens_per_s']:>13,} "
            f"{r['ratio']:>8.3f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} CPUs, no GPU"}
    args.out.write_text(json.dumps({**meta, "results": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
