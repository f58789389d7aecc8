"""What a timed pass costs besides its wall time: CPU use per process and thread, and how full
the adapter kept the engine."""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any


class Probe:
    """CPU use while a pass runs: this process, one thread of it (the event loop), the engine
    core processes (children); and how full the adapter kept the engine (sampled every 2 ms)."""

    def __init__(self, thread_ident: int | None = None, engine: Any = None) -> None:
        self.clock = time.pthread_getcpuclockid(thread_ident) if thread_ident else None
        self.engine = engine
        self.samples: list[tuple[int, int]] = []
        self._stop = threading.Event()

    def _children_cpu(self) -> float:
        try:
            import psutil

            total = 0.0
            for child in psutil.Process().children(recursive=True):
                with contextlib.suppress(Exception):
                    t = child.cpu_times()
                    total += t.user + t.system
            return total
        except Exception:
            return float("nan")

    def _sample(self) -> None:
        engine = self.engine
        while not self._stop.wait(0.002):
            slots = getattr(engine, "_slots", None)
            waiting = sum(len(q) for q in list(getattr(slots, "_waiters", {}).values()))
            self.samples.append((int(engine.inflight), waiting))

    def __enter__(self) -> Probe:
        self.t0 = time.perf_counter()
        self.proc0 = time.process_time()
        self.loop0 = time.clock_gettime(self.clock) if self.clock is not None else 0.0
        self.kids0 = self._children_cpu()
        if self.engine is not None:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.t0
        self.proc = time.process_time() - self.proc0
        self.loop = time.clock_gettime(self.clock) - self.loop0 if self.clock is not None else 0.0
        self.kids = self._children_cpu() - self.kids0
        self._stop.set()
        if self.engine is not None:
            self._thread.join()

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "cpu_process": round(self.proc / self.wall, 3),
            "cpu_engine_core": round(self.kids / self.wall, 3),
        }
        if self.clock is not None:
            out["cpu_loop_thread"] = round(self.loop / self.wall, 3)
        if self.samples:
            cap = max(1, int(getattr(self.engine, "max_inflight", 1)))
            inflight = [s[0] for s in self.samples]
            out["inflight_mean"] = round(sum(inflight) / len(inflight), 1)
            out["inflight_below_half"] = round(
                sum(1 for i in inflight if i < cap / 2) / len(inflight), 3
            )
        return out
