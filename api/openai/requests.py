"""Request lines of a batch input file (pure): a chat-completions request → a classification, or a
LineError saying why it cannot run; and the batch's `completion_window`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from postroom.domain import Label
from postroom.errors import InvalidInput
from postroom.settings import Settings

ENDPOINT = "/v1/chat/completions"
# A candidate for a setting (POSTROOM_BATCH_*): the longest window accepted.
MAX_WINDOW_SECONDS = 30 * 86_400
MAX_TOP_LOGPROBS = 20
_WINDOW = re.compile(r"^\s*(\d+)\s*([smhd])\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86_400}

NOT_A_CLASSIFICATION = (
    'give response_format {"type": "json_schema", "json_schema": {"schema": {"type": "object", '
    '"properties": {"label": {"type": "string", "enum": [labels…]}}}}} or the extension '
    '"postroom": {"labels": [labels…]}'
)


class LineError(Exception):
    """A request line that cannot run; it becomes an error line, never a dropped one."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Task:
    """What all lines of one batch share: they run as one job."""

    model: str
    labels: tuple[Label, ...]
    instructions: str | None


@dataclass(frozen=True)
class Request:
    """One classifiable request line. `answer` is how its label is written: `text`, `json` (a
    JSON string) or `property:<name>` (a JSON object with that one property)."""

    task: Task
    text: str
    answer: str
    top_logprobs: int | None  # None: no logprobs asked

    def metadata(self, line: int) -> dict[str, Any]:
        out: dict[str, Any] = {"line": line, "answer": self.answer}
        if self.top_logprobs is not None:
            out["top_logprobs"] = self.top_logprobs
        return out


def parse_completion_window(value: str) -> int:
    """`24h`, `90m`, `2d`, `30s` → seconds (OpenAI accepts only `24h`; Postroom any such span)."""
    match = _WINDOW.match(value)
    seconds = int(match[1]) * _UNIT_SECONDS[match[2]] if match else 0
    if not 0 < seconds <= MAX_WINDOW_SECONDS:
        raise InvalidInput(
            f"completion_window {value!r} is not valid: give a number and s, m, h or d "
            f"(e.g. 24h), at most {MAX_WINDOW_SECONDS // 86_400}d",
            details=[{"field": "completion_window"}],
        )
    return seconds


def decode_line(raw: bytes | None, *, line: int, settings: Settings) -> tuple[dict[str, Any], str]:
    """A line's JSON object and its custom_id; LineError when either is unusable."""
    if raw is None:
        raise LineError(
            "line_too_long",
            f"line {line} is over {settings.max_document_bytes:,} bytes "
            "(POSTROOM_MAX_DOCUMENT_BYTES); shorten the request",
        )
    try:
        obj = json.loads(raw)
    except ValueError as e:
        raise LineError(
            "invalid_json_line", f"line {line} is not valid JSON ({e}); each line is one object"
        ) from e
    if not isinstance(obj, dict):
        raise LineError(
            "invalid_json_line", f"line {line} is a JSON {type(obj).__name__}, not an object"
        )
    custom_id = obj.get("custom_id")
    if custom_id is None or custom_id == "":
        raise LineError(
            "missing_custom_id",
            f"line {line} has no custom_id; every request needs a unique custom_id string",
        )
    if not isinstance(custom_id, str) or len(custom_id) > settings.max_id_length:
        raise LineError(
            "invalid_custom_id",
            f"line {line}: custom_id must be a string of 1 to {settings.max_id_length} characters",
        )
    return obj, custom_id


def parse_request(obj: dict[str, Any], *, line: int, settings: Settings) -> Request:
    """Map a chat-completions request line to a classification, or raise LineError saying why.

    A `model` that is not a registry alias (say `gpt-4o-mini`) runs on the default model
    (POSTROOM_MODEL); the output's `model` names the alias that ran.
    """
    if obj.get("method") != "POST":
        raise LineError(
            "invalid_method", f'line {line}: method is {obj.get("method")!r}; it must be "POST"'
        )
    if obj.get("url") != ENDPOINT:
        raise LineError(
            "invalid_url",
            f"line {line}: url is {obj.get('url')!r}; every line of this batch must use {ENDPOINT}",
        )
    body = obj.get("body")
    if not isinstance(body, dict):
        raise LineError("invalid_request", f"line {line}: body must be a chat.completions object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise LineError("invalid_request", f"line {line}: body.model must be a non-empty string")
    instructions, text = _messages(body.get("messages"), line)
    labels, answer = _labels_and_answer(body, line)
    top_logprobs = _logprobs_request(body, line)
    alias = model if model in settings.models else settings.model
    task = Task(model=alias, labels=labels, instructions=instructions)
    return Request(task=task, text=text, answer=answer, top_logprobs=top_logprobs)


def _text(content: Any, line: int, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise LineError(
                    "invalid_request", f"line {line}: {where} has a non-text part; only text runs"
                )
            parts.append(str(part.get("text", "")))
        return "\n".join(parts)
    raise LineError("invalid_request", f"line {line}: {where} content must be text")


def _messages(messages: Any, line: int) -> tuple[str | None, str]:
    if not isinstance(messages, list) or not messages:
        raise LineError("invalid_request", f"line {line}: body.messages must be a non-empty list")
    system: list[str] = []
    user: str | None = None
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise LineError("invalid_request", f"line {line}: messages[{index}] is not an object")
        role = message.get("role")
        if role in ("system", "developer"):
            system.append(_text(message.get("content"), line, f"messages[{index}]"))
        elif role == "user":
            user = _text(message.get("content"), line, f"messages[{index}]")
    if user is None:
        raise LineError(
            "invalid_request",
            f"line {line}: no user message; the last user message is the document to classify",
        )
    if not user.strip():
        raise LineError("invalid_request", f"line {line}: the last user message is empty")
    if "\x00" in user:
        raise LineError("invalid_request", f"line {line}: the user message contains a NUL")
    instructions = "\n\n".join(part.strip() for part in system if part.strip())
    return instructions or None, user


def _labels_and_answer(body: dict[str, Any], line: int) -> tuple[tuple[Label, ...], str]:
    extension = _extension_labels(body.get("postroom"), line)
    enum_values: list[str] | None = None
    answer = "text"
    response_format = body.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") == "json_schema":
        json_schema = response_format.get("json_schema")
        schema = json_schema.get("schema") if isinstance(json_schema, dict) else None
        enum_values, answer = _schema_enum(schema, line)
    elif isinstance(response_format, dict) and response_format.get("type") == "json_object":
        answer = "property:label"
    if extension is None and enum_values is None:
        raise LineError(
            "not_a_classification",
            f"line {line} is not a classification request: {NOT_A_CLASSIFICATION}",
        )
    if extension is not None:
        if enum_values is not None and [label.name for label in extension] != enum_values:
            raise LineError(
                "invalid_request",
                f"line {line}: postroom.labels and the schema's enum differ; give the same list",
            )
        return extension, answer
    assert enum_values is not None
    return tuple(Label(name=value) for value in enum_values), answer


def _extension_labels(extension: Any, line: int) -> tuple[Label, ...] | None:
    if extension is None:
        return None
    if not isinstance(extension, dict) or set(extension) != {"labels"}:
        raise LineError(
            "invalid_request",
            f'line {line}: postroom must be {{"labels": [names or {{"name", "description", '
            f'"examples"}}]}}',
        )
    raw = extension["labels"]
    if not isinstance(raw, list):
        raise LineError("invalid_request", f"line {line}: postroom.labels must be a list")
    try:
        return tuple(
            Label(name=item) if isinstance(item, str) else Label.model_validate(item)
            for item in raw
        )
    except ValidationError as e:
        raise LineError(
            "invalid_request",
            f"line {line}: postroom.labels items are names or {{name, description, examples}} "
            f"objects ({e})",
        ) from e


def _schema_enum(schema: Any, line: int) -> tuple[list[str], str]:
    """The enum of a classification schema and the answer shape it asks for."""
    where = f"line {line} is not a classification request: response_format.json_schema.schema"
    if not isinstance(schema, dict):
        raise LineError("not_a_classification", f"{where} is missing")
    if "enum" in schema:
        values, answer = schema["enum"], "json"
    else:
        properties = schema.get("properties")
        if not isinstance(properties, dict) or len(properties) != 1:
            count = len(properties) if isinstance(properties, dict) else 0
            raise LineError(
                "not_a_classification",
                f"{where} has {count} properties; it needs exactly one, whose enum is the labels",
            )
        ((name, prop),) = properties.items()
        if not isinstance(prop, dict) or "enum" not in prop:
            raise LineError(
                "not_a_classification",
                f"{where}: property {name!r} has no enum; its enum is the label set",
            )
        values, answer = prop["enum"], f"property:{name}"
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise LineError("not_a_classification", f"{where}: the enum must be a list of strings")
    return values, answer


def _logprobs_request(body: dict[str, Any], line: int) -> int | None:
    logprobs = body.get("logprobs")
    top = body.get("top_logprobs")
    if logprobs not in (None, True, False):
        raise LineError("invalid_request", f"line {line}: logprobs must be true or false")
    if top is not None and (
        not isinstance(top, int) or isinstance(top, bool) or not 0 <= top <= MAX_TOP_LOGPROBS
    ):
        raise LineError(
            "invalid_request",
            f"line {line}: top_logprobs must be an integer from 0 to {MAX_TOP_LOGPROBS}",
        )
    if logprobs is not True:
        if top:
            raise LineError("invalid_request", f"line {line}: top_logprobs needs logprobs: true")
        return None
    return top or 0
