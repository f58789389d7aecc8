"""postroom/embedded.py: Postgres and Valkey from their wheels start, keep their data across a
restart, are reused while they run, and stop; `auto` / `embedded` URLs resolve to them."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis

from postroom import local_services
from postroom.embedded import PG_USER, answers, start_postgres, start_redis, stop_postgres
from postroom.settings import Settings


@pytest.fixture
def tmp_path() -> Iterator[Path]:
    """A directory the unprivileged Postgres user can enter (pytest's own are root-only)."""
    path = Path(tempfile.mkdtemp(prefix="postroom-embedded-"))
    path.chmod(0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _plain(url: str) -> str:
    return url.replace("+psycopg", "").rsplit("/", 1)[0] + "/postgres"


def test_postgres_keeps_its_data_and_is_reused(tmp_path: Path) -> None:
    server = start_postgres(tmp_path / "pg")
    try:
        assert server.started
        with psycopg.connect(_plain(server.url), autocommit=True) as conn:
            conn.execute("create table kept (n int)")
            conn.execute("insert into kept values (42)")
        if os.geteuid() == 0:  # Postgres refuses root: it runs as the unprivileged user
            assert PG_USER in server.note
            assert (tmp_path / "pg").stat().st_uid != 0
        again = start_postgres(tmp_path / "pg")
        assert not again.started
        assert again.url == server.url
    finally:
        server.stop()
    assert not answers(server.port)
    assert not stop_postgres(tmp_path / "pg")  # nothing left to stop

    restarted = start_postgres(tmp_path / "pg")
    try:
        assert restarted.started
        with psycopg.connect(_plain(restarted.url)) as conn:
            assert conn.execute("select n from kept").fetchone() == (42,)
    finally:
        restarted.stop()


def test_valkey_answers_is_reused_and_keeps_its_data(tmp_path: Path) -> None:
    server = start_redis(tmp_path / "valkey")
    try:
        assert server.started
        redis.Redis.from_url(server.url).set("kept", "yes")
        assert not start_redis(tmp_path / "valkey").started
    finally:
        server.stop()
    assert not answers(server.port)
    restarted = start_redis(tmp_path / "valkey")
    try:
        assert redis.Redis.from_url(restarted.url).get("kept") == b"yes"
    finally:
        restarted.stop()


def test_embedded_urls_resolve_and_say_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = Settings(database_url="embedded", broker_url="embedded", local_dir=str(tmp_path))
    resolved = local_services.resolve(settings)
    try:
        assert resolved.database_url.startswith("postgresql+psycopg://postgres@127.0.0.1:")
        assert resolved.broker_url.startswith("redis://127.0.0.1:")
        err = capsys.readouterr().err
        assert "Postgres: embedded, started" in err
        assert "Redis: embedded, started" in err
        with psycopg.connect(_plain(resolved.database_url)) as conn:
            assert conn.execute("select 1").fetchone() == (1,)
    finally:
        for server in local_services.keep_running():
            server.stop()


def test_auto_prefers_a_local_server_that_answers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if not answers(6379):
        pytest.fail("Redis is not running on 127.0.0.1:6379 (bin/ensure-services starts it)")
    settings = Settings(broker_url="auto", local_dir=str(tmp_path))
    assert local_services.resolve(settings).broker_url == local_services.LOCAL_REDIS
    assert "Redis: the local server on 127.0.0.1:6379" in capsys.readouterr().err
    assert not (tmp_path / "redis").exists()


def test_a_root_only_parent_is_opened_for_the_postgres_user(tmp_path: Path) -> None:
    closed = tmp_path / "closed"  # as a checkout under /root (mode 700) is
    closed.mkdir(mode=0o700)
    server = start_postgres(closed / "pg")
    try:
        assert server.started
        with psycopg.connect(_plain(server.url)) as conn:
            assert conn.execute("select 1").fetchone() == (1,)
        if os.geteuid() == 0:
            assert closed.stat().st_mode & stat.S_IXOTH
            assert f"(o+x) on {closed}" in server.note
    finally:
        server.stop()
