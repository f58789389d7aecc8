"""A model directory's content digest: what `postroom model pin` records and a worker checks.

The digest covers the files that decide a model's answers (weights, configs, tokenizer), each by
its path within the directory and its sha256, so a renamed, added, removed or edited file changes
it. Postroom's own bookkeeping (the marker below) and Python caches are left out.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

DIGEST_PREFIX = "sha256:"
# Written by the builders in worker/ next to the weights: how a directory was made.
MARKER = "postroom-model.json"
_WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_TOKENIZER = (".json", ".model", ".txt", ".tiktoken", ".jinja")


def model_files(directory: Path) -> list[Path]:
    """The files the digest covers, sorted by their path within `directory`."""
    if not directory.is_dir():
        raise FileNotFoundError(f"model directory {directory} does not exist")
    files = [
        p
        for p in directory.rglob("*")
        if p.is_file()
        and p.name != MARKER
        and p.suffix in (*_WEIGHTS, *_TOKENIZER)
        and not any(
            part.startswith(".") or part == "__pycache__" for part in p.relative_to(directory).parts
        )
    ]
    if not any(p.suffix in _WEIGHTS for p in files):
        raise FileNotFoundError(f"model directory {directory} holds no weights")
    return sorted(files, key=lambda p: p.relative_to(directory).as_posix())


def content_digest(directory: Path) -> str:
    """`sha256:<hex>` over `<relative path> <sha256 of file>` lines of `model_files`."""
    outer = hashlib.sha256()
    for path in model_files(directory):
        inner = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                inner.update(block)
        outer.update(f"{path.relative_to(directory).as_posix()} {inner.hexdigest()}\n".encode())
    return DIGEST_PREFIX + outer.hexdigest()


def is_digest(revision: str) -> bool:
    return revision.startswith(DIGEST_PREFIX) and len(revision) == len(DIGEST_PREFIX) + 64
