"""A local Postroom stack for tests: its settings (the tiny model, S3, the stand-in managed API) and
its `postroom api` and `postroom worker` processes, started as compose runs them.

tests/conftest.py builds the shared session fixtures from these and tests/faults/conftest.py the
fault suite's private stack, so both configure, start and wait for Postroom the same way.
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from postroom.db.models import Worker
from postroom.settings import ModelSpec, Settings
from postroom.tenants import create_key
from postroom_cli.local import free_port, http_ok, postroom_command, spawn, stop
from tests.waiting import wait_until


def stack_settings(
    *,
    database_url: str,
    broker_url: str,
    s3_endpoint: str,
    s3_bucket: str,
    tiny_model_dir: Path,
    standin_url: str,
    aliases: Iterable[str] = (),
    models: dict[str, ModelSpec] | None = None,
    **overrides: Any,
) -> Settings:
    """Settings for a stack on loopback.

    The registry gains the tiny model as `tiny` (the default model) and under each of `aliases`;
    spill goes to the stand-in at `standin_url`; `models` adds registry entries of the suite's own.
    Heartbeats and router ticks come every second so tests see state change quickly. `overrides`
    are the suite's own values.
    """
    tiny = ModelSpec(path=str(tiny_model_dir), mode="generative", revision="tiny-seed0")
    return Settings(
        environment="test",
        database_url=database_url,
        broker_url=broker_url,
        s3_endpoint_url=s3_endpoint,
        s3_bucket=s3_bucket,
        s3_access_key_id="testing",
        s3_secret_access_key="testing",
        models={**Settings().models, **dict.fromkeys(("tiny", *aliases), tiny), **(models or {})},
        model="tiny",
        engine_max_num_seqs=32,
        worker_heartbeat_seconds=1.0,
        spill_base_url=standin_url,
        spill_model="standin",
        router_interval_seconds=1.0,
        **overrides,
    )


def tail(path: Path, lines: int = 40) -> str:
    """The last lines of a process log, for a failure message."""
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def wait_alive(
    proc: subprocess.Popen[bytes],
    check: Callable[[], object],
    *,
    what: str,
    timeout: float,
    log: Path,
) -> None:
    """Poll `check` until it holds while `proc` runs; otherwise stop `proc` and fail the run with
    the tail of its log."""
    try:
        wait_until(check, timeout=timeout, what=what, alive=proc)
    except (TimeoutError, RuntimeError) as e:
        stop(proc)
        pytest.fail(f"{e}\n{tail(log)}")


def spawn_api(*, env: dict[str, str], log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """`postroom api` on a free port: the process and its base URL (wait with `wait_api`)."""
    port = free_port()
    proc = spawn(postroom_command("api", "--port", str(port)), env=env, log=log)
    return proc, f"http://127.0.0.1:{port}"


def wait_api(proc: subprocess.Popen[bytes], url: str, *, log: Path) -> None:
    """Until the API at `url` answers /readyz."""
    wait_alive(proc, lambda: http_ok(f"{url}/readyz"), what="API ready", timeout=60, log=log)


def worker_ready(sessions: sessionmaker[Session], pid: int) -> bool:
    """Whether worker process `pid` has registered, with its engines up if it is a GPU worker."""
    with sessions() as session:
        rows = session.execute(select(Worker.name, Worker.route, Worker.stats)).all()
    return any(
        name.endswith(f":{pid}") and (route == "spill" or stats.get("engines"))
        for name, route, stats in rows
    )


def start_worker(
    env: dict[str, str], log: Path, sessions: sessionmaker[Session], *args: str
) -> subprocess.Popen[bytes]:
    """`postroom worker …` as compose runs it; returns once its engines are up."""
    proc = spawn(postroom_command("worker", *args), env=env, log=log)
    wait_alive(
        proc,
        lambda: worker_ready(sessions, proc.pid),
        what="worker engine started",
        timeout=240,
        log=log,
    )
    return proc


def worker_stats(
    sessions: sessionmaker[Session], name_prefix: str = "gpu@"
) -> list[dict[str, Any]]:
    """Each registered worker whose name starts with `name_prefix`: its name and stats."""
    with sessions() as session:
        return [
            {"name": w.name, **w.stats}
            for w in session.scalars(select(Worker).where(Worker.name.startswith(name_prefix)))
        ]


def new_key(sessions: sessionmaker[Session], *, tenant: str | None = None) -> str:
    """An API key for `tenant`, by default a fresh one: tests are isolated by tenant."""
    with sessions.begin() as session:
        return create_key(session=session, tenant=tenant or f"t-{uuid.uuid4().hex[:12]}")


def label_response_format(name: str, labels: list[str]) -> dict[str, Any]:
    """An OpenAI `response_format` asking for `{"label": one of labels}` under a strict JSON
    schema named `name`: what a classification request through the OpenAI routes carries."""
    return {
        "type": "json_schema",
        "json_schema": {
            "name": name,
            "strict": True,
            "schema": {
                "type": "object",
                "properties": {"label": {"type": "string", "enum": labels}},
                "required": ["label"],
                "additionalProperties": False,
            },
        },
    }
