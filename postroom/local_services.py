"""Turning `POSTROOM_DATABASE_URL` / `POSTROOM_BROKER_URL` = `auto` or `embedded` into real URLs.

`embedded` starts Postgres / Valkey from their pip wheels under `POSTROOM_LOCAL_DIR`
(postroom.embedded); `auto` (the default) uses the loopback servers on 5432 / 6379 when they
answer, else the embedded ones. Each choice is said in one line on stderr. The servers this
process started stop when it exits unless `keep_running()` is called; `postroom up` passes the
resolved URLs to the processes it starts.
"""

from __future__ import annotations

import atexit
import sys
from pathlib import Path

from postroom.embedded import EmbeddedServer, answers, start_postgres, start_redis
from postroom.settings import Settings

LOCAL_POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/postroom"
LOCAL_REDIS = "redis://127.0.0.1:6379/0"
CHOICES = ("auto", "embedded")

_started: list[EmbeddedServer] = []


def _stop_started() -> None:
    while _started:
        _started.pop().stop()


atexit.register(_stop_started)


def keep_running() -> list[EmbeddedServer]:
    """Leave the servers this process started running after it exits (`postroom up`); returns
    them."""
    kept = list(_started)
    _started.clear()
    return kept


def needs_resolving(settings: Settings) -> bool:
    return settings.database_url in CHOICES or settings.broker_url in CHOICES


def _say(line: str) -> None:
    sys.stderr.write(line + "\n")


def _pick(kind: str, value: str, *, port: int, local: str, directory: Path) -> str:
    if value == "auto" and answers(port):
        _say(f"✓ {kind}: the local server on 127.0.0.1:{port} (POSTROOM_{_var(kind)}=auto)")
        return local
    why = f"nothing answers on 127.0.0.1:{port}" if value == "auto" else "asked for"
    server = start_postgres(directory) if kind == "Postgres" else start_redis(directory)
    if server.started:
        _started.append(server)
    how = "started" if server.started else "reused"
    note = f", {server.note}" if server.note else ""
    _say(f"✓ {kind}: embedded, {how} on 127.0.0.1:{server.port} in {directory} ({why}{note})")
    return server.url


def _var(kind: str) -> str:
    return "DATABASE_URL" if kind == "Postgres" else "BROKER_URL"


def resolve(settings: Settings) -> Settings:
    """`settings` with `auto` / `embedded` service URLs replaced by real ones (see module doc)."""
    if not needs_resolving(settings):
        return settings
    root = Path(settings.local_dir)
    update: dict[str, str] = {}
    if settings.database_url in CHOICES:
        update["database_url"] = _pick(
            "Postgres",
            settings.database_url,
            port=5432,
            local=LOCAL_POSTGRES,
            directory=root / "postgres",
        )
    if settings.broker_url in CHOICES:
        update["broker_url"] = _pick(
            "Redis", settings.broker_url, port=6379, local=LOCAL_REDIS, directory=root / "redis"
        )
    return settings.model_copy(update=update)
