"""The Classifier Protocol and the engine-backed classifier of the GPU route.

A classifier turns one shard's documents into one DocResult each, in input order. Per-document
problems are results with an `error`; a dead engine is raised (fatal), never swallowed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol, TypeVar

import numpy as np

from postroom.domain import DocResult, JobSpec
from postroom.errors import EngineDeadError
from postroom.prompts import (
    CONTENT_FREE,
    Layout,
    LayoutError,
    build_layout,
    calibration,
    label_texts,
    parse_choice,
    parse_scores,
)
from worker.embedding import Matrix, nearest_labels, prototypes
from worker.engine import EngineAdapter
from worker.loop import LoopThread

_T = TypeVar("_T")
_Prompt = tuple[list[int], bool]  # a request's token ids, and whether the document was cut


class Classifier(Protocol):
    route: str

    def classify(
        self, *, job_id: uuid.UUID, spec: JobSpec, shard: str, docs: Sequence[dict[str, Any]]
    ) -> list[DocResult]: ...


class NullClassifier:
    """Labels from a hash of the text, no model: what the pipeline around the engine can move
    (bench/ceiling.py). Enabled with POSTROOM_WORKER_NULL_CLASSIFIER=true, never by default."""

    route = "gpu"

    def classify(
        self, *, job_id: uuid.UUID, spec: JobSpec, shard: str, docs: Sequence[dict[str, Any]]
    ) -> list[DocResult]:
        names = [label.name for label in spec.labels]
        out = []
        for doc in docs:
            digest = int.from_bytes(
                hashlib.blake2b(str(doc["text"]).encode(), digest_size=4).digest()
            )
            out.append(
                DocResult(id=str(doc["id"]), label=names[digest % len(names)], confidence=1.0)
            )
        return out


class ModelNotHosted(Exception):
    """A shard reached a worker that does not host its model (transient: it goes back)."""


@dataclass(frozen=True)
class _Prepared:
    layout: Layout | None = None
    layout_error: str | None = None
    label_matrix: Matrix | None = None  # embedding mode: one unit prototype per label


@dataclass(frozen=True)
class _Embedded:
    """A document's vector, waiting for its shard to be scored together."""

    doc_id: str
    vector: Matrix
    tokens_in: int
    truncated: bool


class EngineClassifier:
    """Classifies on the worker's own vLLM engines (one per served alias)."""

    route = "gpu"

    def __init__(
        self,
        *,
        loop: LoopThread,
        engines: dict[str, EngineAdapter],
        doc_max_tokens: int,
        choice_max_tokens: int,
        embedding_temperature: float,
        timeout: float,
        submit_chunk: int = 64,
        cache_size: int = 256,
        embedding_center_min_docs: int = 32,
        embedding_label_weight: float = 2.0,
    ) -> None:
        self.loop = loop
        self.engines = engines
        self.doc_max_tokens = doc_max_tokens
        self.choice_max_tokens = choice_max_tokens
        self.embedding_temperature = embedding_temperature
        self.center_min_docs = embedding_center_min_docs
        self.embedding_label_weight = embedding_label_weight
        self.timeout = timeout
        self.submit_chunk = max(1, submit_chunk)
        self._cache: OrderedDict[uuid.UUID, _Prepared] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def classify(
        self, *, job_id: uuid.UUID, spec: JobSpec, shard: str, docs: Sequence[dict[str, Any]]
    ) -> list[DocResult]:
        engine = self.engines.get(spec.model)
        if engine is None:
            raise ModelNotHosted(f"this worker does not host model {spec.model!r}")
        prepared = self._prepare(job_id, spec, engine)
        if spec.mode != "embedding" and prepared.layout is None:
            reason = f"prompt_layout: {prepared.layout_error}"
            return [DocResult(id=str(doc["id"]), error=reason) for doc in docs]
        outcomes = self._run_chunks(engine, prepared, spec, shard, docs)
        if spec.mode != "embedding":
            return [o for o in outcomes if isinstance(o, DocResult)]
        return self._label_embedded(prepared, spec, outcomes)

    def _run_chunks(
        self,
        engine: EngineAdapter,
        prepared: _Prepared,
        spec: JobSpec,
        shard: str,
        docs: Sequence[dict[str, Any]],
    ) -> list[DocResult | _Embedded]:
        # Tokenise a chunk, hand it to the engine, tokenise the next: the engine works on the
        # shard's first documents while this thread tokenises the rest (off the event loop).
        deadline = time.monotonic() + self.timeout
        futures: list[concurrent.futures.Future[Sequence[DocResult | _Embedded]]] = []
        try:
            for start in range(0, len(docs), self.submit_chunk):
                if any(f.done() and not f.cancelled() and f.exception() for f in futures):
                    break  # a chunk failed (a dead engine): stop tokenising, raise it below
                part = docs[start : start + self.submit_chunk]
                ids = [str(doc["id"]) for doc in part]
                tokens = head_tokens(
                    engine.encode_batch,
                    [str(doc["text"]) for doc in part],
                    keep=self._doc_budget(engine, prepared, spec),
                )
                # Prompts are built here too, so the event loop (one thread for the whole
                # worker) only hands them to the engine.
                prompts = [self._prompt(engine, prepared, spec, t) for t in tokens]
                futures.append(
                    self.loop.submit(self._chunk(engine, prepared, spec, shard, ids, prompts))
                )
            results: list[DocResult | _Embedded] = []
            for future in futures:
                results.extend(future.result(timeout=max(0.0, deadline - time.monotonic())))
            return results
        finally:
            for future in futures:
                future.cancel()  # a no-op once done; stops the rest after a failure or timeout

    def _label_embedded(
        self, prepared: _Prepared, spec: JobSpec, outcomes: list[DocResult | _Embedded]
    ) -> list[DocResult]:
        """Score the shard's vectors together (numpy, on this Celery thread, off the loop);
        documents whose request failed keep their error result, in input order."""
        positions = [i for i, o in enumerate(outcomes) if isinstance(o, _Embedded)]
        embedded = [o for o in outcomes if isinstance(o, _Embedded)]
        assert prepared.label_matrix is not None
        results = [o if isinstance(o, DocResult) else DocResult(id=o.doc_id) for o in outcomes]
        if embedded:
            labelled = nearest_labels(
                [label.name for label in spec.labels],
                prepared.label_matrix,
                np.stack([e.vector for e in embedded]),
                ids=[e.doc_id for e in embedded],
                tokens_in=[e.tokens_in for e in embedded],
                truncated=[e.truncated for e in embedded],
                temperature=self.embedding_temperature,
                center_min_docs=self.center_min_docs,
            )
            for position, result in zip(positions, labelled, strict=True):
                results[position] = result
        return results

    def _chunk(
        self,
        engine: EngineAdapter,
        prepared: _Prepared,
        spec: JobSpec,
        shard: str,
        ids: list[str],
        prompts: list[_Prompt],
    ) -> Coroutine[Any, Any, Sequence[DocResult | _Embedded]]:
        if spec.mode == "embedding":
            return self._embed_all(engine, shard, ids, prompts)
        assert prepared.layout is not None
        if spec.decoding == "choice":
            return self._choose_all(engine, prepared.layout, shard, ids, prompts)
        return self._score_all(engine, prepared.layout, shard, ids, prompts)

    def _doc_budget(self, engine: EngineAdapter, prepared: _Prepared, spec: JobSpec) -> int:
        """How many of a document's tokens its request holds (the rest is cut)."""
        if spec.mode == "embedding":
            return self._embedding_budget(engine)
        assert prepared.layout is not None
        return prepared.layout.doc_budget

    def _prompt(
        self, engine: EngineAdapter, prepared: _Prepared, spec: JobSpec, doc_ids: list[int]
    ) -> _Prompt:
        if spec.mode == "embedding":
            return self._embedding_input(engine, doc_ids)
        assert prepared.layout is not None
        return prepared.layout.prompt(doc_ids)

    # -- per job, once
    def _prepare(self, job_id: uuid.UUID, spec: JobSpec, engine: EngineAdapter) -> _Prepared:
        with self._lock:
            if job_id in self._cache:
                self._cache.move_to_end(job_id)
                return self._cache[job_id]
        prepared = self._build(spec, engine, job_id)
        with self._lock:
            self._cache[job_id] = prepared
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return prepared

    def _build(self, spec: JobSpec, engine: EngineAdapter, job_id: uuid.UUID) -> _Prepared:
        if spec.mode == "embedding":
            texts = label_texts(spec.labels, spec.label_template)
            groups = [list(label.examples or ()) for label in spec.labels]
            flat = texts + [example for group in groups for example in group]
            tokens = [self._embedding_input(engine, t)[0] for t in engine.encode_batch(flat)]
            shard = f"{job_id}/labels"

            async def embed_labels() -> list[Matrix]:
                return list(await asyncio.gather(*(engine.embed(t, shard=shard) for t in tokens)))

            vectors = np.stack(self.loop.run(embed_labels(), timeout=self.timeout))
            examples, at = [], len(texts)
            for group in groups:
                examples.append(vectors[at : at + len(group)])
                at += len(group)
            matrix = prototypes(
                vectors[: len(texts)], examples, label_weight=self.embedding_label_weight
            )
            return _Prepared(label_matrix=matrix)
        try:
            layout = build_layout(
                engine.tokenizer(),
                labels=spec.labels,
                instructions=spec.instructions,
                doc_max_tokens=self.doc_max_tokens,
                max_model_len=engine.max_model_len,
            )
        except LayoutError as e:
            return _Prepared(layout_error=str(e))
        if engine.spec.calibrate and spec.decoding == "score":
            layout = self._calibrated(engine, layout, shard=f"{job_id}/calibration")
        return _Prepared(layout=layout)

    def _calibrated(self, engine: EngineAdapter, layout: Layout, *, shard: str) -> Layout:
        """The layout with the model's answers to content-free documents (once per job, in the
        job's cached prefix: a few requests)."""
        prompts = [layout.prompt(ids)[0] for ids in engine.encode_batch(list(CONTENT_FREE))]

        async def score_all() -> list[dict[int, float]]:
            outs = await asyncio.gather(
                *(engine.score(p, layout.answer_ids, shard=shard) for p in prompts)
            )
            return [out.logprobs for out in outs]

        content_free = self.loop.run(score_all(), timeout=self.timeout)
        return replace(layout, calibration=calibration(layout, content_free))

    # -- on the loop
    async def _score_all(
        self,
        engine: EngineAdapter,
        layout: Layout,
        shard: str,
        ids: list[str],
        prompts: list[_Prompt],
    ) -> list[DocResult]:
        async def one(doc_id: str, prompt: list[int], truncated: bool) -> DocResult:
            out = await engine.score(prompt, layout.answer_ids, shard=shard)
            return parse_scores(
                layout, out.logprobs, doc_id=doc_id, tokens_in=len(prompt), truncated=truncated
            )

        return await _gather_per_doc(ids, [one(i, *p) for i, p in zip(ids, prompts, strict=True)])

    async def _choose_all(
        self,
        engine: EngineAdapter,
        layout: Layout,
        shard: str,
        ids: list[str],
        prompts: list[_Prompt],
    ) -> list[DocResult]:
        async def one(doc_id: str, prompt: list[int], truncated: bool) -> DocResult:
            out = await engine.choose(
                prompt, layout.labels, shard=shard, max_tokens=self.choice_max_tokens
            )
            return parse_choice(
                layout.labels,
                doc_id=doc_id,
                text=out.text,
                finish_reason=out.finish_reason,
                logprob_sum=out.logprob_sum,
                tokens_in=len(prompt),
                tokens_out=out.tokens_out,
                truncated=truncated,
            )

        return await _gather_per_doc(ids, [one(i, *p) for i, p in zip(ids, prompts, strict=True)])

    async def _embed_all(
        self, engine: EngineAdapter, shard: str, ids: list[str], prompts: list[_Prompt]
    ) -> list[DocResult | _Embedded]:
        async def one(doc_id: str, prompt: list[int], truncated: bool) -> _Embedded:
            vector = await engine.embed(prompt, shard=shard)
            return _Embedded(doc_id, vector, len(prompt), truncated)

        return await _gather_per_doc(ids, [one(i, *p) for i, p in zip(ids, prompts, strict=True)])

    def _embedding_budget(self, engine: EngineAdapter) -> int:
        before, after = engine.special_tokens()
        return min(self.doc_max_tokens, engine.max_model_len - len(before) - len(after))

    def _embedding_input(self, engine: EngineAdapter, doc_ids: list[int]) -> _Prompt:
        before, after = engine.special_tokens()
        budget = self._embedding_budget(engine)
        truncated = len(doc_ids) > budget
        return [*before, *doc_ids[:budget], *after], truncated


# A long document is tokenised from its head: the text cut at this many characters per token kept
# (no token of ordinary text is longer), and again whole only when the cut gives too few tokens.
CHARS_PER_TOKEN_BOUND = 16
HEAD_MARGIN = 64  # tokens past the budget that the head must give, so the cut word is past it


def head_tokens(
    encode: Callable[[list[str]], list[list[int]]], texts: Sequence[str], *, keep: int
) -> list[list[int]]:
    """Token ids of each text, or of its head when the text is long: a request holds only its
    first `keep` tokens, so a 100,000-character document need not be tokenised whole (on a GPU,
    tokenising is most of the worker's CPU). The head gives at least `keep` + HEAD_MARGIN tokens,
    so the first `keep` are those of the whole text (only the word cut at the end of the head
    could tokenise differently) and a cut document is still seen as longer than `keep`."""
    cap = (keep + HEAD_MARGIN) * CHARS_PER_TOKEN_BOUND
    ids = encode([text[:cap] for text in texts])
    short = [
        i for i, text in enumerate(texts) if len(text) > cap and len(ids[i]) < keep + HEAD_MARGIN
    ]
    if short:  # very long tokens (a base64 blob, a run of one character): the whole text
        for i, whole in zip(short, encode([texts[i] for i in short]), strict=True):
            ids[i] = whole
    return ids


async def _gather_per_doc(
    ids: list[str], coros: list[Coroutine[Any, Any, _T]]
) -> list[_T | DocResult]:
    """Await every document; an error of one request fails that document only, unless fatal."""
    outcomes = await asyncio.gather(*coros, return_exceptions=True)
    results: list[_T | DocResult] = []
    for doc_id, outcome in zip(ids, outcomes, strict=True):
        if isinstance(outcome, EngineDeadError):
            raise outcome
        if isinstance(outcome, BaseException):
            if not isinstance(outcome, Exception):
                raise outcome
            results.append(DocResult(id=doc_id, error=f"engine_error: {outcome}"))
        else:
            results.append(outcome)
    return results
