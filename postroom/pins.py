"""Pinned weights: an alias's content digest in `model_pins`, the revision jobs record, and the
check a worker runs before it serves the alias.

An alias is pinned by `postroom model pin ALIAS` (a row here) or by a registry entry whose
`revision` is itself a digest (`sha256:<hex>`); the row wins when both exist.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import func
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from postroom.db.models import ModelPin
from postroom.errors import PostroomError
from postroom.model_files import content_digest, is_digest
from postroom.settings import ModelSpec, Settings


class PinMismatch(PostroomError):
    """A worker's files for a pinned alias are not the ones pinned (edited, replaced or missing
    weights); the worker refuses to start."""


def pin_model(*, session: Session, alias: str, digest: str, path: str) -> None:
    """Record (or move) `alias`'s pin; running it twice with the same digest changes nothing."""
    stmt = insert(ModelPin).values(alias=alias, digest=digest, path=path)
    session.execute(
        stmt.on_conflict_do_update(
            index_elements=[ModelPin.alias],
            set_={
                "digest": stmt.excluded.digest,
                "path": stmt.excluded.path,
                "pinned_at": func.now(),
            },
        )
    )


def pinned_digest(*, session: Session, alias: str, spec: ModelSpec) -> str | None:
    """The digest `alias` is pinned to, or None when it is not pinned."""
    pin = session.get(ModelPin, alias)
    if pin is not None:
        return pin.digest
    return spec.revision if is_digest(spec.revision) else None


def pinned_spec(*, session: Session, alias: str, spec: ModelSpec) -> ModelSpec:
    """`spec` with the pin as its revision (what jobs and their results record)."""
    digest = pinned_digest(session=session, alias=alias, spec=spec)
    return spec if digest is None else spec.model_copy(update={"revision": digest})


def check_pins(*, session: Session, settings: Settings, aliases: list[str]) -> dict[str, str]:
    """Each pinned alias's digest, after checking the files on this machine match it.

    Raises:
        PinMismatch: naming the alias, the pinned digest and the digest found (or why none was).
    """
    checked = {}
    for alias in aliases:
        expected = pinned_digest(session=session, alias=alias, spec=settings.model_spec(alias))
        if expected is None:
            continue
        path = settings.model_path(alias)
        try:
            found = content_digest(Path(path))
        except FileNotFoundError as e:
            found = f"none ({e})"
        if found != expected:
            raise PinMismatch(
                f"model {alias!r} is pinned to {expected} but its files at {path} digest to "
                f"{found}; restore the pinned files, or re-pin with `postroom model pin {alias}` "
                "if the change is intended"
            )
        checked[alias] = expected
    return checked
