"""The Rust tokenizer (`tokenizers`), called directly: ids only, no special tokens, no Python-side
offsets or masks. One way to reach it for the API's label check and the worker's hot path.

The API loads a model's `tokenizer.json` with `tokenizers` alone: importing transformers would pull
torch into the API process (~400 MB of RSS for a warning about label names).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer as RustBackend


def plain(backend: RustBackend) -> RustBackend:
    """Turn off truncation and padding that tokenizer.json may ask for (transformers turns them
    off per call; a direct call must not truncate or pad on its own)."""
    backend.no_truncation()
    backend.no_padding()
    return backend


def encode_ids(backend: RustBackend, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, no special tokens; holds the GIL only to hand the lists back."""
    if not texts:
        return []
    return [
        encoding.ids
        for encoding in backend.encode_batch_fast(list(texts), add_special_tokens=False)
    ]


class FastTokenizer:
    """`encode(text, add_special_tokens)` over a bare Rust tokenizer (the `prompts.Tokenizer`
    protocol). Not safe to share across threads while encoding; the API uses it under a lock."""

    def __init__(self, backend: RustBackend) -> None:
        self.backend = plain(backend)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.backend.encode(text, add_special_tokens=add_special_tokens).ids)


@functools.lru_cache(maxsize=16)
def load(model_path: str) -> FastTokenizer | None:
    """A model's tokenizer for label checks: its tokenizer.json through `tokenizers`, or None
    for a model that ships none (sentencepiece only): the shared package never imports
    transformers, which would load torch into the API."""
    path = Path(model_path) / "tokenizer.json"
    if path.is_file():
        return FastTokenizer(RustBackend.from_file(str(path)))
    return None
