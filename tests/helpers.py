"""Small builders shared by tests (keyword-only, no factory mega-module)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

from postroom_cli.client import Client
from tests.waiting import wait_until

if TYPE_CHECKING:  # imported when used: they bring vLLM
    from worker.classifier import EngineClassifier
    from worker.engine import EngineAdapter
    from worker.loop import LoopThread

LABELS = ["billing", "technical", "shipping", "account"]
_WORDS = [
    "invoice",
    "charge",
    "login",
    "crash",
    "package",
    "late",
    "refund",
    "password",
    "server",
    "tracking",
    "plan",
]


def make_docs(count: int, *, seed: int = 0, prefix: str = "d") -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [
        {"id": f"{prefix}{i:06d}", "text": " ".join(rng.choices(_WORDS, k=rng.randint(5, 60)))}
        for i in range(count)
    ]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def wait_for_status(client: Client, job_id: str, *, timeout: float = 180) -> dict[str, Any]:
    def finished() -> dict[str, Any] | None:
        job = client.job(job_id)
        return job if job["status"] in ("completed", "failed", "cancelled") else None

    return wait_until(finished, timeout=timeout, what=f"job {job_id} finished")


def engine_classifier(
    loop: LoopThread, engines: dict[str, EngineAdapter], **overrides: Any
) -> EngineClassifier:
    """The worker's classifier over engines a test started, with the default settings."""
    from postroom.settings import Settings
    from worker.classifier import EngineClassifier

    settings = Settings()
    options: dict[str, Any] = {
        "doc_max_tokens": settings.doc_max_tokens,
        "choice_max_tokens": settings.choice_max_tokens,
        "embedding_temperature": settings.embedding_temperature,
        "embedding_label_weight": settings.embedding_label_weight,
        "timeout": 120,
        **overrides,
    }
    return EngineClassifier(loop=loop, engines=engines, **options)
