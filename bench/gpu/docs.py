"""The build phase (child "build"): the model of a shape, the generated documents, the shared
instructions; and the prompt layout and token prompts the engine children make of them."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.gpu.config import INSTRUCTIONS_HEAD, LABELS, MAX_MODEL_LEN, SEED, shape_of


def non_embedding_params(model_dir: Path) -> int:
    """Parameters outside the embeddings and LM head, read from the safetensors headers."""
    total = 0
    for path in sorted(model_dir.glob("*.safetensors")):
        with path.open("rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
        for name, meta in header.items():
            if name == "__metadata__" or "embed_tokens" in name or "lm_head" in name:
                continue
            count = 1
            for dim in meta["shape"]:
                count *= dim
            total += count
    return total


def make_documents(tokenizer: Any, n: int, *, seed: int) -> list[dict[str, Any]]:
    """n documents of 200-600 tokens of the generated vocabulary, cut at a token boundary."""
    from worker.tiny_model import WORDS

    rng = random.Random(seed)
    docs = []
    for i in range(n):
        target = rng.randint(200, 600)
        text = " ".join(rng.choices(WORDS, k=target + 20))
        ids = tokenizer.encode(text, add_special_tokens=False)[:target]
        docs.append({"id": f"d{seed % 1000}-{i}", "text": tokenizer.decode(ids)})
    return docs


def instructions_text(seed: int, words: int) -> str:
    from worker.tiny_model import WORDS

    rng = random.Random(seed)
    return INSTRUCTIONS_HEAD + " " + " ".join(rng.choices(WORDS, k=words)) + "."


def child_build(cfg: dict[str, Any]) -> dict[str, Any]:
    import torch
    from transformers import AutoTokenizer

    from postroom.domain import Label
    from postroom.prompts import build_layout
    from worker.tiny_model import build_model

    model_dir = Path(cfg["model_dir"])
    started = time.monotonic()
    build_model(
        model_dir,
        shape=shape_of(cfg["shape"]),
        architecture="qwen2",
        dtype="bfloat16",
        device=cfg["device"],
    )
    built_s = time.monotonic() - started
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    labels = [Label(name=k, description=v) for k, v in LABELS.items()]
    # ~200-token shared prefix: instructions + label list (grow the instructions to get there).
    words = 0
    while True:
        instructions = instructions_text(SEED, words)
        layout = build_layout(
            tok,
            labels=labels,
            instructions=instructions,
            doc_max_tokens=MAX_MODEL_LEN,
            max_model_len=MAX_MODEL_LEN,
        )
        if len(layout.prefix_ids) >= cfg["prefix_tokens"] or words > 600:
            break
        words += 5
    docs = make_documents(tok, cfg["docs"], seed=SEED)
    warm = make_documents(tok, cfg["warm_docs"], seed=SEED + 1)
    doc_tokens = [len(tok.encode(d["text"], add_special_tokens=False)) for d in docs]
    data = {
        "instructions": instructions,
        "labels": [label.model_dump() for label in labels],
        "docs": docs,
        "warm": warm,
    }
    Path(cfg["docs_path"]).write_text(json.dumps(data))
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {
        "model_build_s": round(built_s, 1),
        "non_embedding_params": non_embedding_params(model_dir),
        "prefix_tokens": len(layout.prefix_ids),
        "suffix_tokens": len(layout.suffix_ids),
        "markers": layout.markers is not None,
        "doc_tokens_min": min(doc_tokens),
        "doc_tokens_max": max(doc_tokens),
        "doc_tokens_mean": round(sum(doc_tokens) / len(doc_tokens), 1),
        "gpu": gpu,
        "torch": torch.__version__,
    }


def load_docs(cfg: dict[str, Any]) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(Path(cfg["docs_path"]).read_text())
    return data


def job_layout(tok: Any, data: dict[str, Any]) -> Any:
    from postroom.domain import Label
    from postroom.prompts import build_layout

    return build_layout(
        tok,
        labels=[Label(**label) for label in data["labels"]],
        instructions=data["instructions"],
        doc_max_tokens=MAX_MODEL_LEN,
        max_model_len=MAX_MODEL_LEN,
    )


def prompts_of(tok: Any, layout: Any, docs: Sequence[dict[str, Any]]) -> list[list[int]]:
    encoded = tok([d["text"] for d in docs], add_special_tokens=False)["input_ids"]
    return [layout.prompt(ids)[0] for ids in encoded]
