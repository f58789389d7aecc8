"""`postroom up`, then `postroom submit FILE --labels … --wait`, then `postroom down`, as a person
types them: real processes on embedded Postgres and Valkey, moto S3, and a spill worker talking to
the stand-in managed API (no vLLM engine to start; `make demo` in CI covers the GPU route)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from postroom.embedded import alive, answers
from postroom_cli.local import free_port, postroom_command
from postroom_cli.standin import StandinServer


@pytest.fixture
def local_dir() -> Iterator[Path]:
    """Where `up` keeps its state; one the unprivileged Postgres user can enter."""
    path = Path(tempfile.mkdtemp(prefix="postroom-up-"))
    path.chmod(0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _run(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        postroom_command(*args),
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_up_submit_wait_down(local_dir: Path, standin: StandinServer, tmp_path: Path) -> None:
    env = {
        "POSTROOM_LOCAL_DIR": str(local_dir),
        "POSTROOM_DATABASE_URL": "embedded",
        "POSTROOM_BROKER_URL": "embedded",
        "POSTROOM_API_PORT": str(free_port()),
        "POSTROOM_SPILL_BASE_URL": standin.url,
        "POSTROOM_SPILL_MODEL": "standin",
    }
    for name in ("POSTROOM_API_KEY", "POSTROOM_API_URL", "POSTROOM_S3_ENDPOINT_URL"):
        env[name] = ""  # the client must find the deployment's API and key by itself
    try:
        first = _run(["up", "--route", "spill"], env, timeout=240)
        assert first.returncode == 0, first.stdout + first.stderr
        assert "Postgres: embedded, started" in first.stderr
        state = json.loads((local_dir / "up.json").read_text())
        assert set(state["pids"]) == {"s3", "api", "beat", "spill:minilm"}
        assert f"key:      {state['key']}" in first.stdout

        second = _run(["up", "--route", "spill"], env, timeout=120)
        assert second.returncode == 0, second.stdout + second.stderr
        assert "all of it was already running" in second.stdout + second.stderr
        assert json.loads((local_dir / "up.json").read_text())["pids"] == state["pids"]

        docs = tmp_path / "docs.jsonl"
        docs.write_text(
            "".join(json.dumps({"id": f"d{i}", "text": f"doc {i}"}) + "\n" for i in range(40))
        )
        submit = _run(
            ["submit", str(docs), "--labels", "billing,shipping", "--spill", "always", "--wait"],
            {k: v for k, v in env.items() if not k.startswith("POSTROOM_API")},
            timeout=120,
        )
        assert submit.returncode == 0, submit.stdout + submit.stderr
        assert "succeeded 40" in submit.stdout + submit.stderr
    finally:
        down = _run(["down"], env, timeout=120)
    assert down.returncode == 0, down.stdout + down.stderr
    assert not (local_dir / "up.json").exists()
    assert not any(alive(pid) for pids in state["pids"].values() for pid in pids)
    postgres = json.loads((local_dir / "postgres" / "server.json").read_text())["port"]
    assert not answers(postgres)
