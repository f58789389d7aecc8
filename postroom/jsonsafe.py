"""JSON that Postroom can store: parsed so that duplicate keys and NaN/Infinity stay visible,
and checked for what Postgres and S3 cannot hold (NUL, lone surrogates, non-finite numbers, depth).
"""

from __future__ import annotations

import json
import math
from typing import Any


class JsonObject(dict[str, Any]):
    """A parsed JSON object that remembers the keys it saw more than once (the last one wins)."""

    duplicates: tuple[str, ...] = ()


class NonFinite:
    """`NaN`, `Infinity` or `-Infinity` in the input: not JSON, kept as a marker so that the
    error can name the field it was in."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


def _object(pairs: list[tuple[str, Any]]) -> JsonObject:
    obj = JsonObject(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        duplicates: list[str] = []
        for key, _ in pairs:
            if key in seen and key not in duplicates:
                duplicates.append(key)
            seen.add(key)
        obj.duplicates = tuple(duplicates)
    return obj


def parse_json(text: str | bytes) -> Any:
    """`json.loads` that keeps duplicate keys and NaN/Infinity visible to `json_problem`.

    Raises ValueError (not JSON) or RecursionError (nested about 1,000 levels deep).
    """
    return json.loads(text, object_pairs_hook=_object, parse_constant=NonFinite)


def show(value: str, limit: int = 40) -> str:
    """A user's string made safe to echo in an error (and to store): cut short, with NULs and
    lone surrogates escaped."""
    cut = value[:limit].encode("utf-8", "backslashreplace").decode("utf-8")
    return cut.replace("\x00", "\\x00") + ("…" if len(value) > limit else "")


def text_problem(value: str) -> str | None:
    """Why a string cannot be stored (a NUL, or a lone surrogate from a `\\ud800` escape)."""
    if "\x00" in value:
        return "contains a NUL character (\\u0000); remove it"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        return (
            f"contains a lone surrogate ({show(value[e.start])} at character {e.start}), which "
            "is not valid Unicode; fix the escape sequence or re-encode the text as UTF-8"
        )
    return None


def type_name(value: Any) -> str:
    if isinstance(value, NonFinite):
        return value.name
    return "dict" if isinstance(value, dict) else type(value).__name__


def json_problem(
    value: Any, *, path: str, max_depth: int, level: int = 1
) -> tuple[str, str] | None:
    """The first thing in a parsed JSON value that Postroom cannot store, as (path, reason):
    a NUL or a lone surrogate in a string or a key, NaN/Infinity or an out-of-range number, a
    duplicate key, or objects and lists nested more than `max_depth` levels deep (the value itself
    is at `level`). Iterative, so no input can exhaust the stack."""
    stack: list[tuple[Any, str, int]] = [(value, path, level)]
    while stack:
        item, where, depth = stack.pop()
        if isinstance(item, str):
            reason = text_problem(item)
            if reason:
                return where, reason
        elif isinstance(item, NonFinite):
            return where, f"{item.name} is not valid JSON; send a number or null"
        elif isinstance(item, float) and math.isnan(item):
            return where, "NaN is not a number JSON allows; send a number or null"
        elif isinstance(item, float) and math.isinf(item):
            return where, "number is out of range (it overflows to infinity); send a smaller one"
        elif isinstance(item, dict | list):
            if depth > max_depth:
                return where, (
                    f"nested more than {max_depth} levels deep (POSTROOM_MAX_METADATA_DEPTH); "
                    "flatten it"
                )
            children: list[tuple[Any, str, int]] = []
            if isinstance(item, dict):
                duplicates = getattr(item, "duplicates", ())
                if duplicates:
                    return where, (
                        f"duplicate key {show(duplicates[0])!r} in one object; send each key once"
                    )
                for key, child in item.items():
                    key_text = str(key)
                    child_path = f"{where}.{show(key_text)}" if where else show(key_text)
                    reason = text_problem(key_text)
                    if reason:
                        return child_path, f"key {reason}"
                    children.append((child, child_path, depth + 1))
            else:
                children = [(child, f"{where}[{i}]", depth + 1) for i, child in enumerate(item)]
            stack.extend(reversed(children))
    return None
