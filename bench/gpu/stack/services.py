"""The deployed stack on one machine, started with the README's and compose's own commands: the
embedded Postgres (as an unprivileged user under root) and Valkey servers of postroom.embedded,
moto's S3 server (`python -m moto.server`), then `postroom migrate`, `postroom keys create`,
`postroom api`, `postroom beat` and one `postroom worker` on the engine, all on loopback.

`GpuStack` also measures each process's CPU time (`cpu()`), and makes the faults of the issue:
`kill_worker()` (kill -9 of the worker's whole process group, engine core included, as a crashed
container) with `start_worker()`, and `restart_redis_empty()`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
from pydantic import SecretStr
from sqlalchemy import select

from postroom import embedded
from postroom.db.models import Worker
from postroom.db.session import make_engine, make_sessionmaker
from postroom.settings import Settings
from postroom.storage import Storage
from postroom_cli.client import Client
from postroom_cli.local import (
    free_port,
    http_ok,
    postroom_command,
    reachable,
    settings_env,
    spawn,
    stop,
    wait_until,
)

FINAL = ("completed", "failed", "cancelled")
ROLES = ("api", "worker", "engine", "postgres", "redis", "moto", "beat", "spill", "driver")


def tree_cpu(root: psutil.Process, *, engine: bool | None = None) -> float:
    """CPU seconds of a process and its descendants (those that exited and were reaped count
    through their parents' children times). engine=True: only vLLM's processes (VLLM::*);
    False: all but them; None: all."""
    total = 0.0
    with contextlib.suppress(psutil.Error):
        for proc in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                is_engine = proc.name().startswith("VLLM") or "EngineCore" in proc.name()
                if engine is not None and is_engine != engine:
                    continue
                t = proc.cpu_times()
                total += t.user + t.system + t.children_user + t.children_system
    return total


class GpuStack:
    """Start with `start()`, stop with `stop()`; `url`, `client`, `settings`, `sessions`."""

    def __init__(
        self, work: Path, settings: Settings, *, worker_args: list[str], spill: bool = False
    ) -> None:
        self.work, self.worker_args, self.spill = work, worker_args, spill
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.base = settings
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.worker_env: dict[str, str] = {}  # the GPU worker's own settings on top (variants)
        # CPU seconds of processes a fault replaced, so a role's total keeps counting them.
        self.cpu_gone: dict[str, float] = dict.fromkeys(ROLES, 0.0)

    # -- start -------------------------------------------------------------------------------

    def start(self, *, wait_engine: bool = True) -> GpuStack:
        pg = embedded.start_postgres(self.work / "postgres")
        self.redis = embedded.start_redis(self.work / "redis")
        moto_port = free_port()
        moto_args = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(moto_port)]
        self.procs["moto"] = spawn(moto_args, env={}, log=self.logs / "moto.log")
        wait_until(
            lambda: reachable("127.0.0.1", moto_port),
            timeout=60,
            what="moto",
            alive=self.procs["moto"],
        )
        self.settings = self.base.model_copy(
            update={
                "database_url": pg.url,
                "broker_url": self.redis.url,
                "s3_endpoint_url": f"http://127.0.0.1:{moto_port}",
                "s3_access_key_id": "bench",  # moto takes any credentials
                "s3_secret_access_key": SecretStr("bench"),
            }
        )
        self.env = settings_env(self.settings)
        # The GPU worker's metrics on a port of its own (its in-flight gauge is sampled during a
        # job); the API, beat and spill worker serve none.
        self.worker_metrics_port = free_port()
        self.env["POSTROOM_WORKER_METRICS_PORT"] = "0"
        Storage(self.settings).ensure_bucket()
        self._cli("migrate")
        key = self._cli("keys", "create", "bench").strip().splitlines()[-1]
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self._spawn("api", "api", "--host", "127.0.0.1", "--port", str(port))
        self._spawn("beat", "beat")
        if self.spill:
            self._spawn("spill", "worker", "--route", "spill", "--concurrency", "8")
        self.start_worker(wait=False)
        wait_until(
            lambda: http_ok(f"{self.url}/readyz"), timeout=120, what="API", alive=self.procs["api"]
        )
        self.engine = make_engine(self.settings)
        self.sessions = make_sessionmaker(self.engine)
        self.client = Client(self.url, key, timeout=600)
        if self.spill:
            # The router spills no deadline work until a spill worker is live; one that cannot
            # build its client exits here (its log says why) instead of failing every shard.
            self._wait_registered("spill", timeout=120)
        if wait_engine:
            self.wait_engine()
        return self

    def _cli(self, *args: str) -> str:
        done = subprocess.run(
            postroom_command(*args),
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"postroom {' '.join(args)}: {done.stderr[-3000:]}")
        return done.stdout

    def _spawn(self, role: str, *args: str) -> None:
        env = self.env
        if role == "worker":
            env = {
                **env,
                "POSTROOM_WORKER_METRICS_PORT": str(self.worker_metrics_port),
                **self.worker_env,
            }
        self.procs[role] = spawn(postroom_command(*args), env=env, log=self.logs / f"{role}.log")

    def inflight(self) -> int | None:
        """Requests the GPU worker has in its engine now (None while it serves no metrics)."""
        try:
            url = f"http://127.0.0.1:{self.worker_metrics_port}/metrics"
            text = httpx.get(url, timeout=1.0).text
        except httpx.HTTPError:
            return None
        for line in text.splitlines():
            if line.startswith("postroom_engine_inflight_requests{"):
                return int(float(line.rsplit(" ", 1)[1]))
        return None

    def start_worker(self, *, wait: bool = True) -> None:
        self._spawn("worker", "worker", *self.worker_args)
        if wait:
            self.wait_engine()

    def wait_engine(self, timeout: float = 600) -> None:
        """The worker is ready when its heartbeat row reports a started engine."""
        self._wait_registered("worker", timeout=timeout, engines=True)

    def _wait_registered(self, name: str, *, timeout: float, engines: bool = False) -> None:
        """Until process `name` has a heartbeat row (with a started engine, if `engines`)."""
        proc = self.procs[name]

        def ready() -> bool:
            with self.sessions() as session:
                rows = session.execute(select(Worker.name, Worker.stats)).all()
            return any(
                n.endswith(f":{proc.pid}") and (not engines or (s or {}).get("engines"))
                for n, s in rows
            )

        what = f"the {name} worker" + ("'s engine" if engines else "")
        wait_until(ready, timeout=timeout, what=what, alive=proc, interval=0.5)

    def wait_jobs(self, job_ids: list[str], timeout: float) -> list[dict[str, Any]]:
        """bench/load.py's interface: every job ended (raises after `timeout`)."""
        end, results = time.monotonic() + timeout, []
        for job_id in job_ids:
            while (job := self.client.job(job_id))["status"] not in FINAL:
                if time.monotonic() > end:
                    raise TimeoutError(
                        f"job {job_id} not done after {timeout:.0f}s: {job['counts']}"
                    )
                time.sleep(0.25)
            results.append(job)
        return results

    def restart_worker(self, env: dict[str, str]) -> None:
        """The GPU worker again, idle, with `env` on top of the stack's settings (a variant)."""
        self.kill_worker()
        self.worker_env = env
        self.start_worker(wait=True)

    # -- faults ------------------------------------------------------------------------------

    def kill_worker(self) -> None:
        """kill -9 the worker's whole process group (the engine core with it), as a crash."""
        last = self.cpu()
        for role in ("worker", "engine"):
            self.cpu_gone[role] = last[role]
        proc = self.procs.pop("worker")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        # The engine core may sit in another group; no vLLM process of ours may outlive it.
        for child in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if child.name().startswith("VLLM"):
                    child.kill()

    def restart_redis_empty(self) -> None:
        """kill -9 the broker and delete its snapshot: it comes back on its port, empty."""
        directory = self.work / "redis"
        self.cpu_gone["redis"] = self.cpu()["redis"]
        pid = int((directory / "valkey.pid").read_text().strip())
        # A snapshot child (BGSAVE, `--save 60 1`) inherits the listening socket: killed with its
        # parent, or the port would still answer and the server come back on another one, which
        # the running processes never learn.
        procs: list[psutil.Process] = []
        with contextlib.suppress(psutil.NoSuchProcess):
            parent = psutil.Process(pid)
            procs = [parent, *parent.children(recursive=True)]
        for proc in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        wait_until(lambda: not embedded.alive(pid), timeout=30, what="valkey gone")
        port = self.redis.port
        wait_until(lambda: not embedded.answers(port, timeout=0.2), timeout=30, what="port free")
        for name in ("dump.rdb", "valkey.pid"):
            (directory / name).unlink(missing_ok=True)
        self.redis = embedded.start_redis(directory)

    # -- measuring ---------------------------------------------------------------------------

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far of each role's processes (see ROLES)."""

        def of(role: str, engine: bool | None = None) -> float:
            proc = self.procs.get(role)
            return tree_cpu(psutil.Process(proc.pid), engine=engine) if proc else 0.0

        out = {
            "api": of("api"),
            "worker": of("worker", engine=False),
            "engine": of("worker", engine=True),
            "moto": of("moto"),
            "beat": of("beat"),
            "spill": of("spill"),
            "driver": sum(psutil.Process().cpu_times()[:2]),
        }
        lines = (self.work / "postgres" / "data" / "postmaster.pid").read_text().splitlines()
        out["postgres"] = tree_cpu(psutil.Process(int(lines[0])))
        pid = int((self.work / "redis" / "valkey.pid").read_text().strip())
        out["redis"] = tree_cpu(psutil.Process(pid))
        return {role: out[role] + self.cpu_gone[role] for role in ROLES}

    def log_tails(self, lines: int = 15) -> str:
        """The last lines of each process's log (for a job that does not finish)."""
        out = []
        for log in sorted(self.logs.glob("*.log")):
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {log.name}\n" + "\n".join(tail))
        return "\n".join(out)

    # -- stop --------------------------------------------------------------------------------

    def stop(self) -> None:
        for role in ("spill", "worker", "beat", "api", "moto"):
            if role in self.procs:
                stop(self.procs.pop(role))
        with contextlib.suppress(AttributeError):
            self.engine.dispose()
        embedded.stop_redis(self.work / "redis")
        embedded.stop_postgres(self.work / "postgres")

    def remove(self) -> None:
        shutil.rmtree(self.work / "postgres", ignore_errors=True)
        shutil.rmtree(self.work / "redis", ignore_errors=True)


def worker_env_note(settings: Settings) -> dict[str, Any]:
    return {k: v for k, v in settings_env(settings).items() if k.startswith("POSTROOM_ENGINE_")}
