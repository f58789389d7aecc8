"""Starting a local stack on one machine: free ports, moto S3, child processes, readiness waits.

Used by `postroom demo`, the benchmarks and the tests, so all three start processes the same way.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx

from postroom.settings import Settings

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def reachable(host: str, port: int, timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def start_moto(port: int | None = None) -> tuple[Any, str]:
    """A real S3 HTTP endpoint on loopback (moto's server mode). Returns (server, endpoint URL)."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per S3 request otherwise
    port = port or free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server, f"http://127.0.0.1:{port}"


def settings_env(settings: Settings) -> dict[str, str]:
    """The POSTROOM_* environment that makes a child process see `settings`."""
    env = {}
    for name, value in settings.model_dump(mode="json").items():
        if isinstance(value, dict | list):
            text = json.dumps(value) if name != "worker_models" else ",".join(value)
        elif isinstance(value, bool):
            text = "true" if value else "false"
        elif value is None:
            continue
        else:
            text = str(value)
        env[f"POSTROOM_{name.upper()}"] = text
    env["POSTROOM_S3_SECRET_ACCESS_KEY"] = settings.s3_secret_access_key.get_secret_value()
    env["POSTROOM_API_KEY"] = settings.api_key.get_secret_value()
    return env


def postroom_command(*args: str) -> list[str]:
    """The `postroom` CLI as a child-process command line (the same interpreter as ours)."""
    return [sys.executable, "-m", "postroom_cli", *args]


def spawn(
    args: list[str], *, env: dict[str, str], log: Path | None = None
) -> subprocess.Popen[bytes]:
    out: Any = log.open("ab") if log else subprocess.DEVNULL
    return subprocess.Popen(
        args,
        env={**os.environ, **env},  # noqa: TID251 - children inherit our environment plus overrides
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def stop(proc: subprocess.Popen[bytes], *, timeout: float = 30.0) -> int:
    """SIGTERM the child's process group, then SIGKILL if it does not exit in `timeout`."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    return proc.returncode


def wait_until(
    check: Callable[[], T | None],
    *,
    timeout: float,
    what: str,
    interval: float = 0.2,
    alive: subprocess.Popen[bytes] | None = None,
) -> T:
    """Poll `check` until it returns a truthy value; raise TimeoutError with the last value seen."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            value = check()
        except Exception as e:  # the thing may not be up yet; keep the error for the message
            last = e
        else:
            if value:
                return value
            last = value
        if alive is not None and alive.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with {alive.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not true after {timeout:.0f}s (last: {last!r})")
        time.sleep(interval)


def http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


@contextlib.contextmanager
def children() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    try:
        yield procs
    finally:
        for proc in reversed(procs):
            stop(proc)
