"""A long document is tokenised from its head only, and its request is the same as if it had been
tokenised whole (the real tokenizers of `tiny` and `minilm`, real review texts)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from postroom.settings import Settings
from worker.classifier import CHARS_PER_TOKEN_BOUND, HEAD_MARGIN, head_tokens
from worker.engine import EngineAdapter

DATA = Path(__file__).resolve().parents[2] / "postroom" / "data" / "movie_reviews.jsonl"


@pytest.mark.parametrize("alias", ["tiny", "minilm"])
def test_heads_give_the_whole_texts_first_tokens(alias: str, tiny_model_dir: Path) -> None:
    settings = Settings()
    path = str(tiny_model_dir) if alias == "tiny" else settings.model_path(alias)
    engine = EngineAdapter(alias=alias, spec=settings.models[alias], path=path, settings=settings)
    reviews = [json.loads(line)["text"] for line in DATA.read_text().splitlines()]
    # Documents of every length around the cut, from a few words to ~100,000 characters.
    texts = [" ".join(reviews[i : i + n]) for i, n in enumerate((1, 3, 10, 40, 80, 160, 700))]
    texts += ["a" * 50_000, "x" + "0123456789" * 5_000]  # one "word" across the cut
    keep = 64
    seen: list[int] = []

    def encode(batch: list[str]) -> list[list[int]]:
        seen.extend(len(t) for t in batch)
        return engine.encode_batch(batch)

    heads = head_tokens(encode, texts, keep=keep)
    whole = engine.encode_batch(texts)
    cap = (keep + HEAD_MARGIN) * CHARS_PER_TOKEN_BOUND
    for head, full, text in zip(heads, whole, texts, strict=True):
        assert head[:keep] == full[:keep]
        assert (len(head) > keep) == (len(full) > keep)  # a cut document is still seen as cut
        if len(text) > cap and len(head) >= keep + HEAD_MARGIN:
            assert len(head) < len(full)  # only the head was tokenised
    # The long reviews went in cut, tokenised once; only a one-"word" text whose head gave too
    # few tokens was tokenised again, whole.
    assert max(seen[: len(texts)]) == cap
    assert set(seen[len(texts) :]) <= {len(texts[-2]), len(texts[-1])}


def test_a_head_with_too_few_tokens_is_tokenised_whole() -> None:
    # A stand-in encoder (one token per 100 characters) whose tokens are longer than the bound:
    # the head would hide the end of the budget, so the whole text is tokenised.
    calls: list[list[int]] = []

    def encode(batch: list[str]) -> list[list[int]]:
        calls.append([len(t) for t in batch])
        return [list(range(len(t) // 100)) for t in batch]

    text = "y" * 1_000_000
    ids = head_tokens(encode, ["short", text], keep=64)
    cap = (64 + HEAD_MARGIN) * CHARS_PER_TOKEN_BOUND
    assert calls == [[5, cap], [len(text)]]
    assert len(ids[1]) == 10_000
    assert ids[0] == []
