"""The model registry as jobs see it: which aliases some worker serves now, and which alias a job
gets (`POSTROOM_MODELS`, `POSTROOM_MODEL`, the job's `model` and `mode`)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from postroom.db.models import Worker
from postroom.domain import Mode
from postroom.errors import UnknownModel
from postroom.settings import ModelSpec, Settings


def served_models(*, session: Session, settings: Settings) -> list[str]:
    """Registry aliases that some worker registered within `worker_registration_ttl` seconds.

    A spill worker serves every alias (through the managed API), so with one registered and a
    spill endpoint configured no job is refused for want of a GPU worker.
    """
    since = datetime.now(UTC) - timedelta(seconds=settings.worker_registration_ttl)
    rows = session.execute(
        select(Worker.route, Worker.models).where(Worker.heartbeat_at >= since)
    ).all()
    served = {alias for _, models in rows for alias in models}
    if settings.spill_base_url and any(route == "spill" for route, _ in rows):
        served |= set(settings.models)
    return sorted(alias for alias in served if alias in settings.models)


def choose_model(
    *, session: Session, settings: Settings, alias: str | None, mode: Mode | None
) -> tuple[str, ModelSpec]:
    """Resolve the job's model alias; refuse unknown or unserved aliases and mode mismatches."""
    served = served_models(session=session, settings=settings)
    if alias is None:
        candidates = [settings.model] if mode is None else []
        if mode is not None:
            ordered = [settings.model, *served]
            candidates = [a for a in ordered if settings.models[a].mode == mode][:1]
        alias = candidates[0] if candidates else None
        if alias is None:
            raise UnknownModel(
                f"no served model does mode {mode!r}; served: {', '.join(served) or 'none'}",
                details=[{"field": "mode", "served": served}],
            )
    if alias not in settings.models or alias not in served:
        raise UnknownModel(
            f"model {alias!r} is not served by any worker; use one of: "
            f"{', '.join(served) or 'none (start a worker: postroom worker --models ALIAS)'}",
            details=[{"field": "model", "served": served}],
        )
    spec = settings.models[alias]
    if mode is not None and spec.mode != mode:
        raise UnknownModel(
            f"model {alias!r} is a {spec.mode} model but the job asks for mode {mode!r}",
            details=[{"field": "mode", "served": served}],
        )
    return alias, spec
