"""An OpenAI batch line's `postroom.labels` may carry few-shot examples (parsing only)."""

from __future__ import annotations

from api.openai.requests import parse_request
from postroom.settings import Settings


def test_openai_batch_lines_carry_examples_and_stay_hashable() -> None:
    labels = [{"name": "sports", "examples": ["Cup final tonight"]}, "politics"]
    line = {
        "custom_id": "r1",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": "minilm",
            "messages": [{"role": "user", "content": "A late goal"}],
            "postroom": {"labels": labels},
        },
    }
    request = parse_request(line, line=1, settings=Settings())
    assert request.task.labels[0].examples == ("Cup final tonight",)
    assert {request.task: 1}[request.task] == 1  # batches group their lines by task
