"""Annotated dependencies: settings, a DB session, storage, the Celery app, the caller."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from api.auth import admin_from_request, caller_from_request
from postroom.queue import Celery
from postroom.settings import Settings
from postroom.storage import Storage
from postroom.tenants import Caller


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def _session(request: Request) -> Iterator[Session]:
    with request.app.state.sessions() as session:
        yield session


def _storage(request: Request) -> Storage:
    storage: Storage = request.app.state.storage
    return storage


def _celery(request: Request) -> Celery:
    celery: Celery = request.app.state.celery
    return celery


SettingsDep = Annotated[Settings, Depends(_settings)]
SessionDep = Annotated[Session, Depends(_session)]
StorageDep = Annotated[Storage, Depends(_storage)]
CeleryDep = Annotated[Celery, Depends(_celery)]
CallerDep = Annotated[Caller, Depends(caller_from_request)]
AdminDep = Annotated[Caller, Depends(admin_from_request)]
