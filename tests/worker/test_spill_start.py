"""A spill worker that could never call the managed API refuses to start, naming what to fix,
instead of heartbeating as alive while every shard it takes fails (the router would keep sending
it work). What is checked: the base URL, and that the HTTP client can be built and its
chat-completions path imported at all."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from postroom_cli.local import postroom_command


def _start(env: dict[str, str], url: str, **extra: str) -> subprocess.CompletedProcess[str]:
    child = {**os.environ, **env, "POSTROOM_SPILL_BASE_URL": url, "COLUMNS": "300", **extra}
    return subprocess.run(
        postroom_command("worker", "--route", "spill"),
        env=child,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("", "POSTROOM_SPILL_BASE_URL is not set"),
        (
            "api.example.com/v1",
            "POSTROOM_SPILL_BASE_URL='api.example.com/v1' is not an http(s) URL",
        ),
        ("http://[::1", "POSTROOM_SPILL_BASE_URL='http://[::1' is not an http(s) URL"),
    ],
)
def test_a_spill_worker_without_a_usable_base_url_refuses_to_start(
    env: dict[str, str], url: str, says: str
) -> None:
    done = _start(env, url)
    assert done.returncode == 3, done.stderr
    assert says in " ".join(done.stderr.split())


@pytest.mark.parametrize("module", ["httpcore2", "jiter"])
def test_a_spill_worker_missing_a_library_of_its_client_refuses_to_start(
    env: dict[str, str], tmp_path: Path, module: str
) -> None:
    # What happened on the offline GPU host, twice: the carried bundle had openai and httpx2 but
    # not httpcore2, which httpx2 imports only when the client is built; then not jiter, which the
    # SDK imports on its first chat completion (the worker died on its first shard, mid-job).
    # Uninstalling from the shared virtualenv is not an option, so a package of that name that
    # fails to import is put first on the path.
    broken = tmp_path / module
    broken.mkdir()
    (broken / "__init__.py").write_text(
        f"raise ModuleNotFoundError(\"No module named '{module}'\", name='{module}')\n"
    )
    done = _start(env, "http://127.0.0.1:9/v1", PYTHONPATH=str(tmp_path))
    assert done.returncode == 3, done.stderr
    said = " ".join(done.stderr.split())
    assert "cannot build the managed API client" in said
    assert f"No module named '{module}'" in said
