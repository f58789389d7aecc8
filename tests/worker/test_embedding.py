"""vLLM's MiniLM vectors match sentence-transformers' on the same texts (real engines, no mocks)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest

from postroom.domain import DEFAULT_INSTRUCTIONS, JobSpec, Label
from postroom.settings import Settings
from tests.helpers import engine_classifier
from worker.engine import EngineAdapter
from worker.loop import LoopThread
from worker.self_check import self_check

TEXTS = [
    "I was charged twice for my invoice this month.",
    "The app crashes every time I try to log in.",
    "My package has been stuck in transit for a week.",
    "Could you tell me whether the Pro plan includes SSO?",
]


@pytest.fixture(scope="module")
def minilm() -> Iterator[tuple[EngineAdapter, LoopThread]]:
    settings = Settings()
    loop = LoopThread()
    engine = EngineAdapter(
        alias="minilm",
        spec=settings.models["minilm"],
        path=settings.model_path("minilm"),
        settings=settings,
    )
    loop.run(engine.start(), timeout=240)
    yield engine, loop
    engine.shutdown()
    loop.stop()


def test_vectors_match_sentence_transformers(minilm: tuple[EngineAdapter, LoopThread]) -> None:
    from sentence_transformers import SentenceTransformer

    engine, loop = minilm
    before, after = engine.special_tokens()
    tokens = [[*before, *ids, *after] for ids in engine.encode_batch(TEXTS)]

    async def embed_all() -> list[list[float]]:
        return [await engine.embed(t, shard="test/0") for t in tokens]

    ours = loop.run(embed_all(), timeout=120)
    reference = SentenceTransformer(engine.path, device="cpu").encode(TEXTS)
    for mine, theirs in zip(ours, reference, strict=True):
        dot = sum(a * float(b) for a, b in zip(mine, theirs, strict=True))
        norm = math.sqrt(sum(a * a for a in mine)) * math.sqrt(sum(float(b) ** 2 for b in theirs))
        assert dot / norm >= 0.999


def test_the_self_check_passes_on_a_healthy_embedding_worker(
    minilm: tuple[EngineAdapter, LoopThread],
) -> None:
    """worker/self_check.py on the embedding route: a healthy worker classifies the neutral
    document, so an attempt that raised is pinned on its shard, not on the worker."""
    engine, loop = minilm
    settings = Settings()
    classifier = engine_classifier(loop, {"minilm": engine})
    spec = JobSpec(
        labels=[Label(name="billing", examples=("I was charged twice.",)), Label(name="bug")],
        instructions=DEFAULT_INSTRUCTIONS,
        mode="embedding",
        model="minilm",
        revision="r",
        label_template=settings.embedding_label_template,
    )
    assert self_check(classifier, spec) is None
