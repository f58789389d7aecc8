"""(a) raw vLLM: the offline `LLM.generate` with token-id prompts and one-step label scoring
(child "raw", or beside (b) in the "engine" child with --paired)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from bench.gpu.config import EngineCfg, engine_kwargs, vllm_env, vllm_version
from bench.gpu.docs import job_layout, load_docs, prompts_of
from bench.gpu.probe import Probe


def label_of(layout: Any, step: dict[int, Any]) -> str | None:
    best, best_lp = None, float("-inf")
    for label, token in zip(layout.labels, layout.answer_ids, strict=True):
        entry = step.get(token)
        lp = float(getattr(entry, "logprob", entry)) if entry is not None else float("-inf")
        if lp > best_lp:
            best, best_lp = label, lp
    return best


class RawEngine:
    """(a): vLLM's offline `LLM` with token-id prompts, tokenized before the clock starts."""

    def __init__(self, cfg: dict[str, Any], engine: EngineCfg, data: dict[str, Any]) -> None:
        from transformers import AutoTokenizer
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt

        tok = AutoTokenizer.from_pretrained(cfg["model_dir"])
        self.tok, self.docs = tok, data["docs"]
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

    def timed(self, name: str, detokenize: bool = False, from_text: bool = False) -> dict[str, Any]:
        """One pass; `from_text` starts the clock at the documents' text (tokenised in one
        batch call of the model's transformers tokenizer, then the same token-id prompts), as a
        user holding text would call it, and as (b) is timed."""
        from vllm.inputs import TokensPrompt

        llm, params = self.llm, (self.params_detok if detokenize else self.params)
        llm.reset_prefix_cache()
        llm.generate(self.warm[:1], params, use_tqdm=False)  # the job's prefix is cached, as in (b)
        with Probe() as probe:
            prompts = self.prompts
            if from_text:
                prompts = [
                    TokensPrompt(prompt_token_ids=p)
                    for p in prompts_of(self.tok, self.layout, self.docs)
                ]
            outs = llm.generate(prompts, params, use_tqdm=False)
        self.labels = [
            label_of(self.layout, o.outputs[0].logprobs[0])
            if o.outputs and o.outputs[0].logprobs
            else None
            for o in outs
        ]
        return {
            "name": name,
            "config": {"kind": "raw_detok" if detokenize else "raw", "from_text": from_text},
            "docs": len(outs),
            "ok": sum(1 for label in self.labels if label is not None),
            "wall_s": probe.wall,
            "prompt_tokens": sum(len(o.prompt_token_ids or []) for o in outs),
            "cached_tokens": sum(int(o.num_cached_tokens or 0) for o in outs),
            **probe.summary(),
        }


def wait_for_peers(barrier: Path, n: int, timeout: float = 900.0) -> None:
    """Engines started together time their passes together: say this one is warm, then wait
    until all `n` are."""
    (barrier / f"ready-{os.getpid()}").touch()
    deadline = time.monotonic() + timeout
    while len(list(barrier.glob("ready-*"))) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(list(barrier.glob('ready-*')))} of {n} engines warm")
        time.sleep(0.1)


def child_raw(cfg: dict[str, Any]) -> dict[str, Any]:
    if cfg.get("cuda_visible_devices") is not None:  # a scaling run: this engine's GPUs
        os.environ["CUDA_VISIBLE_DEVICES"] = cfg["cuda_visible_devices"]
    vllm_env(cfg["device"])
    raw = RawEngine(cfg, EngineCfg(**cfg["engine"]), load_docs(cfg))
    if cfg.get("barrier_dir"):
        wait_for_peers(Path(cfg["barrier_dir"]), cfg["barrier_n"])
    passes = [raw.timed(f"LLM.generate rep {rep + 1}") for rep in range(cfg["repeats"])]
    if cfg.get("from_text"):
        passes += [
            raw.timed(f"LLM.generate from text rep {rep + 1}", from_text=True)
            for rep in range(cfg["repeats"])
        ]
    return {
        "engine_start_s": raw.start_s,
        "passes": passes,
        "labels": raw.labels,
        "vllm": vllm_version(),
    }
