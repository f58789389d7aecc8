"""Lines of a batch's output and error files (pure): chat completions holding the label, logprobs
over the label set, error lines; ids derive from the batch id and the line's key (a rerun rewrites).
"""

from __future__ import annotations

import json
import math
import uuid
from typing import IO, Any

from api.openai.requests import LineError
from postroom.db.models import Result
from postroom.keys import request_line_id
from postroom.storage import encode_jsonl

SPOOL_BYTES = 8 * 1024 * 1024  # output files spill to disk past this; never whole in memory
LOGPROB_FLOOR = -9999.0  # what OpenAI reports for a token of (near) zero probability


def error_line(
    batch_id: uuid.UUID, *, key: str, custom_id: str | None, code: str, message: str
) -> dict[str, Any]:
    """An OpenAI batch error line. `key` makes its id: the line number for lines refused at
    creation (a duplicate custom_id must not share its id), the custom_id for documents."""
    return {
        "id": request_line_id(batch_id, key),
        "custom_id": custom_id,
        "response": None,
        "error": {"code": code, "message": message},
    }


def answer_content(answer: str, label: str) -> str:
    """The message content a request's response_format asks for, holding the label."""
    if answer == "json":
        return json.dumps(label, ensure_ascii=False)
    if answer.startswith("property:"):
        return json.dumps({answer.removeprefix("property:"): label}, ensure_ascii=False)
    return label


def _logprob(p: float) -> float:
    return max(math.log(p), LOGPROB_FLOOR) if p > 0 else LOGPROB_FLOOR


def _token(name: str, p: float) -> dict[str, Any]:
    return {"token": name, "logprob": _logprob(p), "bytes": list(name.encode())}


def label_logprobs(
    label: str, *, distribution: dict[str, float] | None, confidence: float | None, top: int
) -> dict[str, Any]:
    """One pseudo-token per label (its name), logprob = ln(probability over the label set)."""
    probs = distribution or {label: confidence if confidence is not None else 1.0}
    ranked = sorted(probs.items(), key=lambda item: item[1], reverse=True)[:top]
    chosen = _token(label, probs.get(label, confidence or 0.0))
    chosen["top_logprobs"] = [_token(name, p) for name, p in ranked]
    return {"content": [chosen], "refusal": None}


def output_line(batch_id: uuid.UUID, *, doc: dict[str, Any], row: Result) -> dict[str, Any]:
    """An OpenAI batch output line for a classified document."""
    meta = doc.get("metadata") or {}
    custom_id = str(doc["id"])
    label = row.label or ""
    top = meta.get("top_logprobs")
    logprobs = (
        label_logprobs(label, distribution=row.distribution, confidence=row.confidence, top=top)
        if top is not None
        else None
    )
    line_id = request_line_id(batch_id, custom_id)
    # The completion and request ids share the line id's digest: stable across reruns.
    digest = line_id.removeprefix("batch_req_")
    completion = {
        "id": f"chatcmpl-{digest}",
        "object": "chat.completion",
        "created": int(row.updated_at.timestamp()),
        "model": row.model,
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": answer_content(str(meta.get("answer", "text")), label),
                    "refusal": None,
                },
                "logprobs": logprobs,
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": row.tokens_in,
            "completion_tokens": row.tokens_out,
            "total_tokens": row.tokens_in + row.tokens_out,
        },
        "system_fingerprint": row.revision,
        "postroom": {"label": label, "confidence": row.confidence, "truncated": row.truncated},
    }
    return {
        "id": line_id,
        "custom_id": custom_id,
        "response": {"status_code": 200, "request_id": f"req_{digest}", "body": completion},
        "error": None,
    }


def jsonl(row: dict[str, Any]) -> bytes:
    """One JSONL line, byte for byte as postroom.storage writes them."""
    return encode_jsonl([row])


class ErrorLines:
    """Error lines of the requests refused at creation, written to a spool (disk past
    SPOOL_BYTES); the first few kept for the batch's `errors`."""

    def __init__(self, batch_id: uuid.UUID, spool: IO[bytes], *, keep: int) -> None:
        self.batch_id = batch_id
        self.spool = spool
        self.keep = keep
        self.count = 0
        self.first: list[dict[str, Any]] = []

    def add(self, *, custom_id: str | None, line: int, error: LineError) -> None:
        self.count += 1
        if len(self.first) < self.keep:
            self.first.append({"code": error.code, "line": line, "message": error.message})
        key = f"line:{line}"
        row = error_line(
            self.batch_id, key=key, custom_id=custom_id, code=error.code, message=error.message
        )
        self.spool.write(jsonl(row))
