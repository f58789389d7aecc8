"""Pipeline efficiency: the same documents through (a) the vLLM engine called directly and (b) the
whole pipeline (upload → API → S3 → Redis → worker → S3 + Postgres → job completed).

Both sides use the same engine options (built by worker.engine.EngineAdapter.engine_options from the
same Settings) and the same prompts (postroom.prompts.build_layout), measured in one run: (a) keeps
its engine between passes, the stack keeps its worker, and the timed passes alternate a, b, a, b, …
so that the machine's drift falls on both sides alike; each pair runs on documents of its own (the
same on both sides), so no pass finds the one before it in a prefix cache. Both are timed from
text: (a) includes tokenising the documents (the worker tokenises too) but not reading them; (b)
runs from the first byte of the upload to the job's `finished_at`.

    .venv/bin/python bench/pipeline.py        # 6,000 docs generative (tiny), 2,000 embedding
    .venv/bin/python bench/pipeline.py --docs 2000 --modes generative --repeats 5

`--baseline DIR` adds (b0): a second stack whose processes import Postroom from DIR (another
checkout, e.g. `git worktree add /tmp/base HEAD~3`), timed in the same rotation a, b0, b, so a
change to the pipeline is measured against the code before it in one run.

Prints a table and writes bench/results/pipeline.json.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import random
import statistics
import time
from pathlib import Path
from typing import Any

import psutil
from report import bench_parser, parse_bench_args, print_table, scratch_dir, write_results
from stack import LABELS, Stack, bench_settings

MODES = {"generative": "tiny", "embedding": "minilm"}
DEFAULT_DOCS = {"generative": 6000, "embedding": 2000}


def make_docs(count: int, *, seed: int = 1234) -> list[dict[str, str]]:
    """Generated support-ticket-like texts, 40 to 400 words (about 50 to 600 tokens), fixed seed."""
    from worker.tiny_model import WORDS

    rng = random.Random(seed)
    return [
        {"id": f"b{i:07d}", "text": " ".join(rng.choices(WORDS, k=rng.randint(40, 400)))}
        for i in range(count)
    ]


ROLES = (
    ("VLLM::", "engine"),
    ("postgres", "postgres"),
    ("redis", "redis"),
    ("moto", "moto"),
    ("celeryd", "worker"),
    (" worker", "worker"),
    (" api", "api"),
)


def role_of(proc: psutil.Process) -> str:
    """What a process is, from its name and command line (the last group: this driver, (a)'s own
    process, anything else on the machine)."""
    try:
        text = f"{proc.info['name']} {' '.join(proc.info['cmdline'] or [])}"
    except (KeyError, TypeError):
        return "other"
    return next((role for needle, role in ROLES if needle in text), "other")


def cpu_seconds() -> dict[int, tuple[str, float]]:
    """CPU time (user + system) of every process on the machine, by pid, with its role."""
    out = {}
    for proc in psutil.process_iter(["name", "cmdline", "cpu_times"]):
        times = proc.info["cpu_times"]
        if times is not None:
            out[proc.pid] = (role_of(proc), times.user + times.system)
    return out


def cpu_split(before: dict[int, tuple[str, float]]) -> dict[str, Any]:
    """CPU seconds used since `before`: in vLLM's engine processes (`VLLM::EngineCore`,
    `VLLM::Worker`: the model itself) and in everything else (the API, the worker's Python,
    Postgres, Redis, S3, this driver), that split by role. On 2 cores the second is taken from
    the first."""
    by_role: dict[str, float] = {}
    for pid, (role, total) in cpu_seconds().items():
        used = total - before.get(pid, (role, 0.0))[1]
        by_role[role] = by_role.get(role, 0.0) + used
    engine = by_role.pop("engine", 0.0)
    return {
        "engine_cpu_s": round(engine, 2),
        "other_cpu_s": round(sum(by_role.values()), 2),
        "other_by_role": {role: round(v, 2) for role, v in sorted(by_role.items())},
    }


class Direct:
    """(a) vLLM's offline `LLM` with token-id prompts: the best direct way we know on this machine.
    The engine starts once; each `run()` is one timed pass from text to labels."""

    def __init__(self, settings: Any, alias: str) -> None:
        from vllm import LLM

        from postroom.domain import Label
        from postroom.prompts import build_layout
        from worker.engine import EngineAdapter, set_vllm_environment

        self.spec = settings.models[alias]
        self.adapter = EngineAdapter(
            alias=alias, spec=self.spec, path=settings.model_path(alias), settings=settings
        )
        set_vllm_environment(settings, self.adapter.device)
        started = time.monotonic()
        self.llm = LLM(**self.adapter.engine_options())
        self.start_seconds = time.monotonic() - started
        if self.spec.mode == "embedding":
            before, after = self.adapter.special_tokens()
            self.wrap = (before, after)
            self.budget = min(
                settings.doc_max_tokens, self.adapter.max_model_len - len(before) - len(after)
            )
        else:
            labels = [Label(**label) for label in LABELS]
            self.layout = build_layout(
                self.adapter.tokenizer(),
                labels=labels,
                instructions="Classify the support ticket.",
                doc_max_tokens=settings.doc_max_tokens,
                max_model_len=self.adapter.max_model_len,
            )

    def run(self, texts: list[str]) -> dict[str, Any]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        cpu = cpu_seconds()
        t0 = time.monotonic()
        tokens = self.adapter.encode_batch(texts)
        if self.spec.mode == "embedding":
            before, after = self.wrap
            prompts = [
                TokensPrompt(prompt_token_ids=[*before, *t[: self.budget], *after]) for t in tokens
            ]
            outputs = self.llm.embed(prompts, use_tqdm=False)
            assert len(outputs) == len(texts)
        else:
            prompts = [TokensPrompt(prompt_token_ids=self.layout.prompt(t)[0]) for t in tokens]
            params = SamplingParams(
                max_tokens=1,
                temperature=0.0,
                logprobs=len(LABELS),
                allowed_token_ids=list(self.layout.answer_ids),
                detokenize=False,
            )
            outputs = self.llm.generate(prompts, params, use_tqdm=False)
            assert all(o.outputs[0].logprobs for o in outputs)
        seconds = time.monotonic() - t0
        prompt_tokens = sum(len(p["prompt_token_ids"]) for p in prompts)
        return {
            "seconds": seconds,
            "docs_per_s": len(texts) / seconds,
            "prompt_tokens": prompt_tokens,
            "tokens_per_s": prompt_tokens / seconds,
            **cpu_split(cpu),
        }

    def close(self) -> None:
        del self.llm  # the engine core process exits with its last reference
        gc.collect()


def measure(
    mode: str, docs_count: int, repeats: int, logs: Path, baseline: Path | None = None
) -> dict[str, Any]:
    alias = MODES[mode]
    # Each pair of passes gets documents of its own (the same on both sides): a pass over the
    # documents of the one before would find some of them still in an engine's prefix cache, as
    # many as the order it ran them in leaves there, which differs between (a) and (b).
    passes: list[tuple[list[str], Path]] = []
    for rep in range(repeats):
        docs = make_docs(docs_count, seed=1234 + rep)
        path = logs / f"{mode}-{rep}.jsonl"
        path.write_text("".join(json.dumps(d) + "\n" for d in docs))
        passes.append(([d["text"] for d in docs], path))
    warm = logs / f"{mode}-warm.jsonl"
    warm_docs = make_docs(300, seed=99)
    warm.write_text("".join(json.dumps(d) + "\n" for d in warm_docs))
    settings = bench_settings()
    stack_settings = settings.model_copy(update={"model": alias, "worker_models": [alias]})
    direct_runs: list[dict[str, Any]] = []
    pipeline_runs: list[dict[str, Any]] = []
    baseline_runs: list[dict[str, Any]] = []

    def timed(stack: Stack, path: Path) -> dict[str, Any]:
        cpu = cpu_seconds()
        run = stack.run_job(path, docs_count, model=alias)
        run.update(cpu_split(cpu))
        run.pop("job")
        return run

    with contextlib.ExitStack() as stacks:
        old = None
        if baseline is not None:
            (logs / "baseline").mkdir(exist_ok=True)
            env = {"PYTHONPATH": str(baseline.resolve())}
            old = stacks.enter_context(Stack(stack_settings, logs / "baseline", env=env))
        stack = stacks.enter_context(Stack(stack_settings, logs))
        direct = Direct(settings, alias)
        try:
            direct.run([d["text"] for d in warm_docs])  # warm-up on other documents, every side
            for side in (old, stack):
                if side is not None:
                    side.run_job(warm, len(warm_docs), model=alias)
            for texts, path in passes:
                direct_runs.append(direct.run(texts))
                if old is not None:
                    baseline_runs.append(timed(old, path))
                pipeline_runs.append(timed(stack, path))
                line = f"  {mode}: (a) {direct_runs[-1]['docs_per_s']:.1f} docs/s, "
                if old is not None:
                    line += f"(b0) {baseline_runs[-1]['docs_per_s']:.1f} docs/s, "
                print(line + f"(b) {pipeline_runs[-1]['docs_per_s']:.1f} docs/s", flush=True)
        finally:
            direct.close()
    direct_rate = statistics.median(r["docs_per_s"] for r in direct_runs)
    pipeline_rate = statistics.median(r["docs_per_s"] for r in pipeline_runs)
    tokens = statistics.median(r["prompt_tokens"] for r in direct_runs)
    extra: dict[str, Any] = {}
    if baseline_runs:
        baseline_rate = statistics.median(r["docs_per_s"] for r in baseline_runs)
        extra = {
            "baseline": str(baseline),
            "baseline_docs_per_s": round(baseline_rate, 1),
            "baseline_ratio": round(baseline_rate / direct_rate, 3),
            "baseline_pair_ratios": [
                round(b["docs_per_s"] / a["docs_per_s"], 3)
                for a, b in zip(direct_runs, baseline_runs, strict=True)
            ],
        }
    return {
        **extra,
        "mode": mode,
        "model": alias,
        "docs": docs_count,
        "direct_docs_per_s": round(direct_rate, 1),
        "direct_tokens_per_s": round(tokens * direct_rate / docs_count),
        "pipeline_docs_per_s": round(pipeline_rate, 1),
        "pipeline_tokens_per_s": round(tokens * pipeline_rate / docs_count),
        "ratio": round(pipeline_rate / direct_rate, 3),
        "pair_ratios": [
            round(b["docs_per_s"] / a["docs_per_s"], 3)
            for a, b in zip(direct_runs, pipeline_runs, strict=True)
        ],
        "engine_start_s": round(direct.start_seconds, 1),
        "cpu_s_median": {
            side: {
                key: round(statistics.median(r[key] for r in runs), 2)
                for key in ("engine_cpu_s", "other_cpu_s")
            }
            for side, runs in (("direct", direct_runs), ("pipeline", pipeline_runs))
        },
        "runs": {"direct": direct_runs, "pipeline": pipeline_runs, "baseline": baseline_runs},
    }


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--docs", type=int, default=None, help="default: 6,000 / 2,000")
    parser.add_argument("--modes", default="generative,embedding")
    parser.add_argument("--repeats", type=int, default=3, help="(a, b) pairs per mode")
    parser.add_argument(
        "--baseline", type=Path, default=None, help="also time the pipeline of this checkout"
    )
    args = parse_bench_args(parser, "pipeline")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logs = scratch_dir("bench")
    rows = [
        measure(mode, args.docs or DEFAULT_DOCS[mode], args.repeats, logs, args.baseline)
        for mode in args.modes.split(",")
    ]
    print_table(
        f"{'mode':<11} {'model':<7} {'docs':>7} {'(a) docs/s':>11} {'(b) docs/s':>11}"
        f" {'(b) tokens/s':>13} {'(b)/(a)':>8}  pairs",
        (
            f"{r['mode']:<11} {r['model']:<7} {r['docs']:>7,} {r['direct_docs_per_s']:>11,.1f} "
            f"{r['pipeline_docs_per_s']:>11,.1f} {r['pipeline_tokens_per_s']:>13,} "
            f"{r['ratio']:>8.3f}  {' '.join(f'{x:.2f}' for x in r['pair_ratios'])}"
            for r in rows
        ),
    )
    for r in rows:
        if "baseline_ratio" in r:
            pairs = " ".join(f"{x:.2f}" for x in r["baseline_pair_ratios"])
            print(
                f"{r['mode']:<11} baseline {r['baseline']}: (b0) "
                f"{r['baseline_docs_per_s']:,.1f} docs/s, "
                f"(b0)/(a) {r['baseline_ratio']:.3f}  {pairs}"
            )
    print_table(
        "CPU seconds per pass (median): vLLM engine processes / everything else",
        (cpu_row(r) for r in rows),
    )
    write_results(args.out, {"results": rows})


def cpu_row(r: dict[str, Any]) -> str:
    a, b = r["cpu_s_median"]["direct"], r["cpu_s_median"]["pipeline"]
    return (
        f"{r['mode']:<11} (a) {a['engine_cpu_s']:>6.1f} / {a['other_cpu_s']:>5.1f}   "
        f"(b) {b['engine_cpu_s']:>6.1f} / {b['other_cpu_s']:>5.1f}"
    )


if __name__ == "__main__":
    main()
