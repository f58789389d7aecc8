"""config/example.env lists every setting with its default, and only those."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from postroom.settings import Settings

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "example.env"


def _default_text(name: str) -> str:
    value = getattr(Settings(), name)
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return ""
    if name == "worker_models":
        return ",".join(value)
    if isinstance(value, dict):
        return json.dumps(
            {k: v.model_dump(mode="json") for k, v in value.items()}, separators=(",", ":")
        )
    return str(value)


def _example() -> dict[str, str]:
    entries = {}
    for line in EXAMPLE.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, value = line.partition("=")
            entries[name] = value
    return entries


def test_example_env_lists_every_setting_with_its_default() -> None:
    example = _example()
    expected = {f"POSTROOM_{name.upper()}": _default_text(name) for name in Settings.model_fields}
    assert set(example) == set(expected), set(example) ^ set(expected)
    for name, value in expected.items():
        assert example[name] == value, name


def test_example_env_parses_back_into_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in _example().items():
        monkeypatch.setenv(name, value)
    assert Settings() == Settings.model_validate({})


def test_bad_values_name_the_variable() -> None:
    with pytest.raises(ValidationError, match="POSTROOM_MODEL"):
        Settings(model="nope")
    with pytest.raises(ValidationError, match="POSTROOM_WORKER_MODELS"):
        Settings(worker_models=["nope"])
