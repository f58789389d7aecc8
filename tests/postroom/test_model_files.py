"""The content digest `postroom model pin` records: it follows every file that decides a model's
answers and nothing else."""

from __future__ import annotations

from pathlib import Path

import pytest

from postroom.model_files import MARKER, content_digest, is_digest, model_files


def make_model(directory: Path) -> Path:
    directory.mkdir()
    (directory / "model.safetensors").write_bytes(b"\x00\x01weights")
    (directory / "config.json").write_text('{"hidden_size": 8}')
    (directory / "tokenizer.json").write_text('{"model": {}}')
    return directory


def test_digest_is_stable_and_changes_with_weights_config_and_tokenizer(tmp_path: Path) -> None:
    model = make_model(tmp_path / "m")
    first = content_digest(model)
    assert is_digest(first)
    assert content_digest(model) == first
    for name, content in (
        ("model.safetensors", b"\x00\x02weights"),
        ("config.json", b'{"hidden_size": 9}'),
        ("tokenizer.json", b'{"model": {"x": 1}}'),
    ):
        original = (model / name).read_bytes()
        (model / name).write_bytes(content)
        assert content_digest(model) != first, name
        (model / name).write_bytes(original)
    assert content_digest(model) == first


def test_a_renamed_or_added_file_changes_it_but_bookkeeping_does_not(tmp_path: Path) -> None:
    model = make_model(tmp_path / "m")
    first = content_digest(model)
    (model / MARKER).write_text("{}")
    (model / ".cache").mkdir()
    (model / ".cache" / "x.json").write_text("{}")
    assert content_digest(model) == first
    (model / "tokenizer.json").rename(model / "tokenizer2.json")
    assert content_digest(model) != first
    (model / "tokenizer2.json").rename(model / "tokenizer.json")
    (model / "special_tokens_map.json").write_text("{}")
    assert content_digest(model) != first


def test_a_directory_without_weights_has_no_digest(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="holds no weights"):
        model_files(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        content_digest(tmp_path / "missing")
