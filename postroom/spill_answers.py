"""The managed API's answers, shared by the spill worker (chat completions) and the patient-spill
collector (batch output lines): the label-set schema to ask with, and reading the answer back."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any


def response_schema(labels: Sequence[str]) -> dict[str, Any]:
    return {
        "type": "json_schema",
        "json_schema": {
            "name": "classification",
            "strict": True,
            "schema": {
                "type": "object",
                "properties": {"label": {"type": "string", "enum": list(labels)}},
                "required": ["label"],
                "additionalProperties": False,
            },
        },
    }


def parse_answer(content: str | None, labels: Sequence[str]) -> tuple[str | None, str | None]:
    """(label, None) for a valid answer, else (None, why it is not one)."""
    try:
        value = json.loads(content or "")
    except ValueError:
        return None, f"unparseable answer {str(content)[:40]!r}"
    label = value.get("label") if isinstance(value, dict) else value
    if isinstance(label, str) and label in labels:
        return label, None
    return None, f"answer {str(label)[:40]!r} is not one of the labels"


def answer_confidence(choice: Any) -> float | None:
    logprobs = _get(choice, "logprobs")
    content = _get(logprobs, "content") if logprobs else None
    if not content:
        return None
    return round(math.exp(sum(float(_get(token, "logprob") or 0.0) for token in content)), 6)


def _get(value: Any, name: str) -> Any:
    """An attribute of an SDK object, or the key of the same object parsed from JSON."""
    return value.get(name) if isinstance(value, dict) else getattr(value, name, None)
