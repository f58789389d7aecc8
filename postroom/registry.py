"""The model registry as jobs see it: which aliases some worker serves now, and which alias a job
gets (`POSTROOM_MODELS`, `POSTROOM_MODEL`, the job's `model` and `mode`)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from postroom.db.models import Worker
from postroom.domain import Mode
from postroom.errors import UnknownModel
from postroom.pins import pinned_spec
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


def live_models(*, session: Session, settings: Settings) -> list[str]:
    """Registry aliases served by a worker alive now (a heartbeat within POSTROOM_GPU_DEAD_AFTER
    seconds): a job for any other alias waits for a worker."""
    since = datetime.now(UTC) - timedelta(seconds=settings.gpu_dead_after)
    rows = session.execute(
        select(Worker.route, Worker.models).where(Worker.heartbeat_at >= since)
    ).all()
    served = {alias for route, models in rows if route == "gpu" for alias in models}
    return sorted(alias for alias in served if alias in settings.models)


def waiting_note(alias: str) -> str:
    return f"waiting for a worker serving {alias}"


def choose_model(
    *, session: Session, settings: Settings, alias: str | None, mode: Mode | None
) -> tuple[str, ModelSpec]:
    """Resolve the job's model alias: any alias in the registry (POSTROOM_MODELS) is accepted,
    whether or not a worker serves it now (the job waits for one; autoscalers start workers
    from the queue depth). Refuse only unknown aliases and mode mismatches. With only a `mode`,
    the default model if it has that mode, else a served alias, else any registry alias. A pinned
    alias's spec carries its digest as the revision (postroom/pins.py)."""
    registry = sorted(settings.models)
    if alias is None:
        alias = settings.model
        if mode is not None:
            served = served_models(session=session, settings=settings)
            ordered = [settings.model, *served, *registry]
            candidates = [a for a in ordered if settings.models[a].mode == mode][:1]
            if not candidates:
                raise UnknownModel(
                    f"no model in the registry does mode {mode!r}; "
                    f"registered: {', '.join(registry)}",
                    details=[{"field": "mode", "registered": registry}],
                )
            alias = candidates[0]
    if alias not in settings.models:
        raise UnknownModel(
            f"model {alias!r} is not in the registry (POSTROOM_MODELS); use one of: "
            f"{', '.join(registry)}",
            details=[{"field": "model", "registered": registry}],
        )
    spec = settings.models[alias]
    if mode is not None and spec.mode != mode:
        raise UnknownModel(
            f"model {alias!r} is a {spec.mode} model but the job asks for mode {mode!r}",
            details=[{"field": "mode", "registered": registry}],
        )
    return alias, pinned_spec(session=session, alias=alias, spec=spec)
