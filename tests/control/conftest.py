"""Fixtures the control-process tests share: a Celery app and a Redis client on the test broker."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from postroom.queue import Celery, make_celery
from postroom.settings import Settings


@pytest.fixture
def celery(settings: Settings) -> Iterator[Celery]:
    app = make_celery(settings)
    yield app
    app.close()


@pytest.fixture
def broker(settings: Settings) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(settings.broker_url)
    yield client
    client.close()
