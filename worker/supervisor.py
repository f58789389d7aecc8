"""`postroom worker --gpus 0,1`: one worker process per GPU group, each restarted alone on exit.

Each child is an ordinary `postroom worker` with `CUDA_VISIBLE_DEVICES` set to its group, its own
metrics port (the base port + its index) and so its own heartbeat row (worker names carry the pid).
A child that exits is started again after a backoff that doubles up to
`worker_restart_backoff_max_seconds` and resets once the child has run for a minute; the others
are never touched. SIGTERM or SIGINT stops every child (SIGTERM, then SIGKILL after a grace period)
and then the supervisor.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType

from postroom.gpus import GpuGroup
from postroom.settings import Settings

logger = logging.getLogger(__name__)
HEALTHY_AFTER_S = 60.0
STOP_GRACE_S = 30.0
POLL_S = 0.2


@dataclass
class Child:
    group: GpuGroup
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    restarts: int = 0
    backoff: float = 1.0
    due: float = 0.0  # monotonic time of the next start, while it is down
    exits: list[int] = field(default_factory=list)


def child_environment(settings: Settings, group: GpuGroup) -> dict[str, str]:
    env = dict(os.environ)  # noqa: TID251 - children inherit the supervisor's configuration
    env["CUDA_VISIBLE_DEVICES"] = group.cuda_visible_devices
    env["POSTROOM_VISIBLE_GPUS"] = group.cuda_visible_devices
    port = settings.worker_metrics_port
    env["POSTROOM_WORKER_METRICS_PORT"] = str(port + group.index if port else 0)
    return env


def child_command(worker_args: list[str]) -> list[str]:
    return [sys.executable, "-m", "postroom_cli", "worker", *worker_args]


class Supervisor:
    """Keeps one child per GPU group running until `stop()`."""

    def __init__(
        self,
        settings: Settings,
        groups: list[GpuGroup],
        *,
        worker_args: list[str],
        spawn: Callable[[list[str], dict[str, str]], subprocess.Popen[bytes]] | None = None,
    ) -> None:
        self.settings = settings
        self.children = [Child(group) for group in groups]
        self.worker_args = worker_args
        self._spawn = spawn or (lambda cmd, env: subprocess.Popen(cmd, env=env))
        self._stop = threading.Event()

    def run(self) -> None:
        for child in self.children:
            self._start(child)
        while not self._stop.wait(POLL_S):
            for child in self.children:
                self._tend(child)
        self._stop_all()

    def stop(self, *_: object) -> None:
        self._stop.set()

    def install_signal_handlers(self) -> None:
        def handler(signum: int, _frame: FrameType | None) -> None:
            logger.info("supervisor: %s, stopping every worker", signal.Signals(signum).name)
            self.stop()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def _start(self, child: Child) -> None:
        env = child_environment(self.settings, child.group)
        child.proc = self._spawn(child_command(self.worker_args), env)
        child.started = time.monotonic()
        logger.info(
            "supervisor: worker %d on GPU %s started (pid %d)",
            child.group.index,
            child.group.cuda_visible_devices,
            child.proc.pid,
        )

    def _tend(self, child: Child) -> None:
        now = time.monotonic()
        if child.proc is None:
            if now >= child.due:
                child.restarts += 1
                self._start(child)
            return
        code = child.proc.poll()
        if code is None:
            return
        ran = now - child.started
        if ran >= HEALTHY_AFTER_S:
            child.backoff = 1.0
        child.exits.append(code)
        child.proc = None
        child.due = now + child.backoff
        logger.warning(
            "supervisor: worker %d on GPU %s exited with %d after %.0fs; restarting in %.0fs",
            child.group.index,
            child.group.cuda_visible_devices,
            code,
            ran,
            child.backoff,
        )
        child.backoff = min(child.backoff * 2, self.settings.worker_restart_backoff_max_seconds)

    def _stop_all(self) -> None:
        running = [child.proc for child in self.children if child.proc is not None]
        for proc in running:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for proc in running:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
