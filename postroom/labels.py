"""Label sets: the checks every job's labels pass, and the first-token collision warning."""

from __future__ import annotations

import functools
import re
import threading
from collections.abc import Sequence
from typing import Any

from postroom import tokens
from postroom.domain import Label
from postroom.errors import InvalidInput, InvalidLabels
from postroom.prompts import first_token_collisions
from postroom.settings import Settings

_SPACES = re.compile(r"\s+")
_TOKENIZER_LOCK = threading.Lock()


def normalise_label(name: str) -> str:
    """The form two label names are compared in: case- and whitespace-insensitive."""
    return _SPACES.sub(" ", name).strip().casefold()


def validate_labels(raw: Sequence[str | Label], *, settings: Settings) -> list[Label]:
    """Check a label set; raise InvalidLabels naming every problem."""
    labels = [Label(name=item) if isinstance(item, str) else item for item in raw]
    problems: list[dict[str, Any]] = []
    if len(labels) < settings.min_labels:
        problems.append(
            {
                "field": "labels",
                "reason": f"{len(labels)} label(s) given; a job needs at least "
                f"{settings.min_labels} (POSTROOM_MIN_LABELS)",
            }
        )
    if len(labels) > settings.max_labels:
        problems.append(
            {
                "field": "labels",
                "reason": f"{len(labels)} labels given; at most {settings.max_labels} are allowed "
                "(POSTROOM_MAX_LABELS)",
            }
        )
    seen: dict[str, int] = {}
    for index, label in enumerate(labels):
        where = f"labels[{index}]"
        name = label.name.strip()
        if not name:
            problems.append({"field": f"{where}.name", "reason": "empty label name"})
            continue
        if len(name) > settings.max_label_length:
            problems.append(
                {
                    "field": f"{where}.name",
                    "reason": f"label name is {len(name)} characters; the limit is "
                    f"{settings.max_label_length} (POSTROOM_MAX_LABEL_LENGTH)",
                }
            )
        if label.description and len(label.description) > settings.max_description_length:
            problems.append(
                {
                    "field": f"{where}.description",
                    "reason": f"description is over {settings.max_description_length} characters "
                    "(POSTROOM_MAX_DESCRIPTION_LENGTH)",
                }
            )
        problems.extend(_example_problems(label, where, settings))
        key = normalise_label(name)
        if key in seen:
            problems.append(
                {
                    "field": f"{where}.name",
                    "reason": f"duplicate of labels[{seen[key]}] ({labels[seen[key]].name!r}); "
                    "names must differ ignoring case and spaces",
                }
            )
        else:
            seen[key] = index
    total = sum(len(label.examples or ()) for label in labels)
    if total > settings.max_examples_total:
        problems.append(
            {
                "field": "labels",
                "reason": f"{total} examples in all; a job may carry at most "
                f"{settings.max_examples_total} (POSTROOM_MAX_EXAMPLES_TOTAL): give fewer "
                "per label",
            }
        )
    if problems:
        raise InvalidLabels(
            f"the label set is invalid: {problems[0]['reason']}",
            details=problems[: settings.max_error_details],
        )
    return [
        Label(
            name=label.name.strip(),
            description=label.description,
            examples=tuple(" ".join(e.split()) for e in label.examples) if label.examples else None,
        )
        for label in labels
    ]


def _example_problems(label: Label, where: str, settings: Settings) -> list[dict[str, Any]]:
    """What is wrong with a label's few-shot examples, each naming the label."""
    examples: tuple[str, ...] = label.examples or ()
    problems: list[dict[str, Any]] = []
    if len(examples) > settings.max_label_examples:
        problems.append(
            {
                "field": f"{where}.examples",
                "reason": f"label {label.name!r} has {len(examples)} examples; the limit is "
                f"{settings.max_label_examples} per label (POSTROOM_MAX_LABEL_EXAMPLES)",
            }
        )
    for number, example in enumerate(examples):
        if not example.strip():
            problems.append(
                {
                    "field": f"{where}.examples[{number}]",
                    "reason": f"example {number} of label {label.name!r} is empty; remove it",
                }
            )
        elif len(example) > settings.max_example_length:
            problems.append(
                {
                    "field": f"{where}.examples[{number}]",
                    "reason": f"example {number} of label {label.name!r} is {len(example)} "
                    f"characters; shorten it to {settings.max_example_length} "
                    "(POSTROOM_MAX_EXAMPLE_LENGTH)",
                }
            )
    return problems


def validate_label_template(template: str | None, *, settings: Settings) -> str:
    """A job's `label_template`, or the deployment's default; raise InvalidInput unless it
    is a short text with `{name}` and no other placeholder."""
    if template is None:
        return settings.embedding_label_template
    reason = None
    if "{name}" not in template:
        reason = "it must contain {name}, e.g. 'A news article about {name}.'"
    elif len(template) > settings.max_label_length:
        reason = f"it is over {settings.max_label_length} characters (POSTROOM_MAX_LABEL_LENGTH)"
    else:
        try:
            template.format(name="x")
        except (KeyError, IndexError, ValueError):
            reason = "its only placeholder may be {name}; write other braces as {{ and }}"
    if reason:
        raise InvalidInput(
            f"label_template is invalid: {reason}", details=[{"field": "label_template"}]
        )
    return template


@functools.lru_cache(maxsize=4096)
def label_collisions(model_path: str, names: tuple[str, ...]) -> list[tuple[str, ...]]:
    """Groups of labels that start with the same token under the model's tokenizer (none when
    the model ships no tokenizer.json: the check needs no transformers or torch)."""
    tokenizer = tokens.load(model_path)
    if tokenizer is None:
        return []
    # Requests run in a thread pool; a Rust tokenizer must not encode in two threads at once.
    with _TOKENIZER_LOCK:
        return first_token_collisions(tokenizer, names)
