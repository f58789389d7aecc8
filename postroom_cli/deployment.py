"""`postroom up` / `postroom down`: the whole local deployment in the background.

`up` starts what is not running yet: Postgres and Redis (resolved by get_settings(): the loopback
servers or the embedded ones), a moto S3 server, `postroom api`, `postroom beat` and one worker,
then prints the URLs and a key. What it started is written to `<POSTROOM_LOCAL_DIR>/up.json`, so a
second `up` reuses what runs, client commands find the API and key there, and `down` stops it all.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select

from postroom.db.migrate import migrate
from postroom.db.models import Worker
from postroom.db.session import make_engine, make_sessionmaker
from postroom.embedded import alive, answers, stop_postgres, stop_redis
from postroom.local_services import keep_running
from postroom.settings import Settings
from postroom.tenants import create_key
from postroom_cli.local import free_port, http_ok, postroom_command, spawn, wait_until

TENANT = "local"


@dataclass
class Deployment:
    """What `up` runs: URLs, the key, process ids (by role) and the embedded servers it started."""

    api_url: str = ""
    key: str = ""
    s3_endpoint: str = ""
    database_url: str = ""
    broker_url: str = ""
    pids: dict[str, list[int]] = field(default_factory=dict)
    embedded: list[str] = field(default_factory=list)
    logs: str = ""

    def env(self) -> dict[str, str]:
        """The environment that points a process at this deployment's services."""
        env = {"POSTROOM_DATABASE_URL": self.database_url, "POSTROOM_BROKER_URL": self.broker_url}
        if self.s3_endpoint:
            env.update(
                POSTROOM_S3_ENDPOINT_URL=self.s3_endpoint,
                POSTROOM_S3_ACCESS_KEY_ID="local",
                POSTROOM_S3_SECRET_ACCESS_KEY="local",
            )
        return env


def state_path(settings: Settings) -> Path:
    return Path(settings.local_dir) / "up.json"


def load(settings: Settings) -> Deployment | None:
    """The deployment `up` recorded, with only the processes still running; None if none."""
    try:
        data = json.loads(state_path(settings).read_text())
    except (OSError, ValueError):
        return None
    deployment = Deployment(**data)
    deployment.pids = {
        role: running
        for role, pids in deployment.pids.items()
        if (running := list(filter(alive, pids)))
    }
    return deployment


def _save(settings: Settings, deployment: Deployment) -> None:
    path = state_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(deployment), indent=2))
    path.chmod(0o600)  # it holds an API key


def _start(deployment: Deployment, role: str, args: list[str], env: dict[str, str]) -> Any:
    log = Path(deployment.logs) / f"{role.replace(':', '-')}.log"
    proc = spawn(args, env=env, log=log)
    deployment.pids.setdefault(role, []).append(proc.pid)
    return proc


def up(
    settings: Settings,
    *,
    alias: str,
    route: str = "gpu",
    workers: int = 1,
    extra_env: dict[str, str] | None = None,
    started: list[str] | None = None,
    say: Any = print,
) -> tuple[Deployment, list[str]]:
    """Start what is not running of the local deployment, with `workers` workers for `alias` on
    `route`; returns it and the roles this call started (also appended to `started` as they
    start, so a caller can stop them when this raises). `extra_env` goes to the processes this
    call starts. Embedded servers this process started are left running only once all is up."""
    deployment = load(settings) or Deployment()  # a second `up` reuses what runs
    started = [] if started is None else started
    deployment.database_url, deployment.broker_url = settings.database_url, settings.broker_url
    deployment.logs = str((Path(settings.local_dir) / "logs").resolve())
    Path(deployment.logs).mkdir(parents=True, exist_ok=True)
    if not settings.s3_endpoint_url and "s3" not in deployment.pids:
        port = free_port()
        deployment.s3_endpoint = f"http://127.0.0.1:{port}"
        args = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
        proc = _start(deployment, "s3", args, {})
        wait_until(lambda: answers(port), timeout=60, what="S3 (moto) answering", alive=proc)
        started.append("s3")
    elif settings.s3_endpoint_url:
        deployment.s3_endpoint = ""
    env = {**deployment.env(), **(extra_env or {})}
    effective = settings.model_copy(update=_settings_update(deployment))
    from postroom.storage import Storage

    Storage(effective).ensure_bucket()
    migrate(effective.database_url)
    engine = make_engine(effective)
    try:
        procs = _start_processes(deployment, settings, env, started, alias, route, workers)
        if not deployment.key:
            with make_sessionmaker(engine).begin() as session:
                deployment.key = create_key(session=session, tenant=TENANT)
        _save(settings, deployment)
        say(f"… waiting for the API and the {route} worker for {alias!r} (logs: {deployment.logs})")
        wait_until(
            lambda: http_ok(f"{deployment.api_url}/readyz"),
            timeout=60,
            what="API ready",
            alive=procs.get("api"),
        )
        role = f"{route}:{alias}"
        sessions = make_sessionmaker(engine)

        def ready() -> bool:
            with sessions() as session:
                rows = session.execute(select(Worker.name, Worker.route, Worker.stats)).all()
            return any(
                name.endswith(f":{pid}")
                and (route == "spill" or alias in (stats.get("engines") or {}))
                for name, _, stats in rows
                for pid in deployment.pids.get(role, [])
            )

        wait_until(ready, timeout=600, what="worker engine started", alive=procs.get(role))
    finally:
        engine.dispose()
    deployment.embedded = sorted({*deployment.embedded, *(s.name for s in keep_running())})
    _save(settings, deployment)
    return deployment, started


def _settings_update(deployment: Deployment) -> dict[str, Any]:
    if not deployment.s3_endpoint:
        return {}
    from pydantic import SecretStr

    return {
        "s3_endpoint_url": deployment.s3_endpoint,
        "s3_access_key_id": "local",
        "s3_secret_access_key": SecretStr("local"),
    }


def _start_processes(
    deployment: Deployment,
    settings: Settings,
    env: dict[str, str],
    started: list[str],
    alias: str,
    route: str,
    workers: int,
) -> dict[str, Any]:
    """Start the API, beat and the workers that are not running; the new processes by role."""
    procs: dict[str, Any] = {}
    # No metrics ports: a local deployment has no Prometheus, and they could clash.
    env = {**env, "POSTROOM_WORKER_METRICS_PORT": "0", "POSTROOM_BEAT_METRICS_PORT": "0"}
    if "api" not in deployment.pids:
        port = settings.api_port if not answers(settings.api_port) else free_port()
        deployment.api_url = f"http://127.0.0.1:{port}"
        procs["api"] = _start(deployment, "api", postroom_command("api", "--port", str(port)), env)
        started.append("api")
    if "beat" not in deployment.pids:
        procs["beat"] = _start(deployment, "beat", postroom_command("beat"), env)
        started.append("beat")
    role = f"{route}:{alias}"
    args = postroom_command("worker", "--models", alias, "--route", route)
    for _ in range(workers - len(deployment.pids.get(role, []))):
        procs[role] = _start(deployment, role, args, env)
        if role not in started:
            started.append(role)
    return procs


def down(settings: Settings, *, roles: list[str] | None = None) -> list[str]:
    """Stop the deployment's processes (only `roles` when given, and then no servers); the roles
    stopped. Embedded servers `up` started stop too."""
    deployment = load(settings)
    if deployment is None:
        return []
    stopped = []
    for role in sorted(deployment.pids, key=lambda r: r in ("s3", "api")):  # workers first
        if roles is not None and role not in roles:
            continue
        for pid in deployment.pids.pop(role):
            _terminate(pid)
        stopped.append(role)
    if roles is None:
        root = Path(settings.local_dir)
        if "postgres" in deployment.embedded and stop_postgres(root / "postgres"):
            stopped.append("postgres")
        if "redis" in deployment.embedded and stop_redis(root / "redis"):
            stopped.append("redis")
        state_path(settings).unlink(missing_ok=True)
    else:
        _save(settings, deployment)
    return stopped


def _terminate(pid: int, timeout: float = 30.0) -> None:
    """SIGTERM the process group `spawn` made, SIGKILL it if it is still there after `timeout`."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGTERM)
    try:
        wait_until(lambda: not alive(pid), timeout=timeout, what=f"process {pid} exiting")
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
