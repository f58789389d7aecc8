"""The API's error bodies for database errors raised by real Postgres: a transaction ended for a
conflict with another (here a lock wait past lock_timeout) is a 503 to retry, anything else a 500.

The handlers are installed on a small app of two routes (served in-process by Starlette's test
client), because no route of the real API can be made to lose a lock race on demand."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from api.errors import install_error_handlers

LOCK_KEY = 7_350_001  # an advisory lock no other code takes


@pytest.fixture
def client(sessions: sessionmaker[Session]) -> Iterator[TestClient]:
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/locked")
    def locked() -> dict[str, str]:
        with sessions.begin() as session:
            session.execute(text("SET LOCAL lock_timeout = '100ms'"))
            session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": LOCK_KEY})
        return {"ok": "locked"}

    @app.post("/broken")
    def broken() -> dict[str, str]:
        with sessions.begin() as session:
            session.execute(text("SELECT 1 / 0"))
        return {"ok": "divided"}

    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


def test_a_request_that_loses_a_lock_race_is_a_503_to_retry(
    client: TestClient, sessions: sessionmaker[Session]
) -> None:
    # Given another transaction holding the lock the route needs
    with sessions.begin() as holder:
        holder.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": LOCK_KEY})
        # When the route waits for it past its lock_timeout
        response = client.post("/locked")
    # Then the client is told to send it again, and when it does, it goes through
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    error = response.json()["error"]
    assert error["code"] == "unavailable"
    assert "send the same request again" in error["message"]
    assert client.post("/locked").json() == {"ok": "locked"}


def test_any_other_database_error_is_a_500(client: TestClient) -> None:
    response = client.post("/broken")
    assert response.status_code == 500
    assert response.json()["error"]["code"] == "internal_error"
