"""Label sets: the checks every job's labels pass, and the first-token collision warning."""

from __future__ import annotations

import functools
import re
import threading
from collections.abc import Sequence
from typing import Any

from postroom import tokens
from postroom.domain import Label
from postroom.errors import InvalidLabels
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
    if problems:
        raise InvalidLabels(
            f"the label set is invalid: {problems[0]['reason']}",
            details=problems[: settings.max_error_details],
        )
    return [Label(name=label.name.strip(), description=label.description) for label in labels]


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
