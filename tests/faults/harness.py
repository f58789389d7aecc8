"""Real processes the fault suite controls.

A private Redis and Postgres on free ports, a TCP proxy in front of S3, and a supervisor that
restarts the worker like compose's `restart: unless-stopped`.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
from pathlib import Path

import redis

from postroom_cli.local import free_port, reachable, spawn, stop
from tests.waiting import wait_until

POLL = 0.2


def _as_postgres() -> list[str]:
    # initdb and postgres refuse to run as root; CI runs as root, so drop to the postgres user.
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


class PrivateRedis:
    """A redis-server of our own (never the shared one), restartable and floodable."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.directory = directory
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
            ],
            stdout=subprocess.DEVNULL,
        )
        wait_until(lambda: reachable("127.0.0.1", self.port), timeout=20, what="private redis")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None

    def restart_empty(self) -> None:
        """No persistence: everything queued is gone, as after a real restart."""
        self.stop()
        self.start()

    def flushall(self) -> None:
        redis.Redis(port=self.port).flushall()


class PrivatePostgres:
    """A throwaway cluster (initdb + pg_ctl) on a free port, so restarting it disturbs no one."""

    def __init__(self) -> None:
        binaries = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
        if not binaries:
            raise RuntimeError("PostgreSQL server binaries not found under /usr/lib/postgresql")
        self.bin = Path(binaries[-1])
        self.port = free_port()
        # Not under pytest's tmp (0700, root's): the postgres user must be able to reach it.
        self.directory = Path(tempfile.mkdtemp(prefix="postroom-pg-"))
        self.directory.chmod(0o755)
        self.data = self.directory / "data"
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postroom"

    def _run(self, *args: str) -> None:
        subprocess.run([*_as_postgres(), *args], check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            subprocess.run(["chown", "-R", "postgres", str(self.directory)], check=True)
        if not self.data.exists():
            self._run(
                str(self.bin / "initdb"),
                "-D",
                str(self.data),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
            )
        self._pg_ctl("start")

    def _pg_ctl(self, action: str) -> None:
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k /tmp -c fsync=off"
        self._run(
            str(self.bin / "pg_ctl"),
            "-D",
            str(self.data),
            "-o",
            options,
            "-w",
            "-l",
            str(self.directory / "postgres.log"),
            "-m",
            "fast",
            action,
        )

    def restart(self) -> None:
        self._pg_ctl("restart")

    def stop(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self._pg_ctl("stop")
        shutil.rmtree(self.directory, ignore_errors=True)


class TcpProxy:
    """Forwards 127.0.0.1:port to a target port; `block()` cuts every connection and refuses new
    ones until `unblock()` (the dependency is unreachable, not merely slow)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.blocked = threading.Event()
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.blocked.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets.update((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.close()

    def block(self) -> None:
        self.blocked.set()
        with self._lock:
            sockets, self._sockets = self._sockets, set()
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
                s.close()

    def unblock(self) -> None:
        self.blocked.clear()

    def close(self) -> None:
        self.block()
        self.listener.close()


class Supervised:
    """Keeps one `postroom …` process running; counts the restarts it had to make."""

    def __init__(self, args: list[str], *, env: dict[str, str], log: Path) -> None:
        self.args = args
        self.env = env
        self.log = log
        self.restarts = 0
        self._stopping = threading.Event()
        self.proc = spawn(args, env=env, log=log)
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stopping.wait(POLL):
            if self.proc.poll() is not None:
                # Like a container runtime: clear what the dead process left (its engine core),
                # then start a new one.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                if self._stopping.is_set():
                    return
                self.restarts += 1
                self.proc = spawn(self.args, env=self.env, log=self.log)

    def kill9(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)

    def pause(self) -> None:
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.killpg(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=5)
        stop(self.proc)
