"""A job's options, the same for every way in (API, upload, drop folder, OpenAI batch), and the
worker's spec made from them: labels, model, instructions and cascade checked, 422 otherwise."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy.orm import Session

from postroom.domain import (
    CASCADE_SPILL,
    DEFAULT_INSTRUCTIONS,
    Cascade,
    CascadeOptions,
    Decoding,
    JobSpec,
    Label,
    Mode,
    OnInvalid,
    Priority,
    SpillPolicy,
)
from postroom.errors import InvalidInput
from postroom.labels import label_collisions, validate_label_template, validate_labels
from postroom.registry import choose_model
from postroom.settings import Settings


class JobOptions(BaseModel):
    """Everything about a job except its documents (the same for every entry point)."""

    model_config = ConfigDict(extra="forbid")

    labels: list[str | Label] = Field(
        description="label names, or {name, description?, examples?} objects"
    )
    label_template: str | None = Field(
        default=None,
        description="embedding mode: how a label without a description is phrased, with {name} "
        "(default POSTROOM_EMBEDDING_LABEL_TEMPLATE)",
    )
    instructions: str | None = None
    mode: Mode | None = None
    model: str | None = None
    decoding: Decoding = "score"
    spill: SpillPolicy = "auto"
    deadline: datetime | float | None = Field(
        default=None, description="ISO 8601 time, or seconds from now"
    )
    metadata: dict[str, Any] | None = None
    on_invalid: OnInvalid = "reject"
    priority: Priority = Field(
        default="normal", description="high, normal or low (up to the tenant's maximum)"
    )
    max_spill_cost: float | None = Field(
        default=None, ge=0, description="the most this job may spend on the managed API, in $"
    )
    webhook_url: str | None = Field(
        default=None, description="where job.completed/failed/cancelled/expired are POSTed"
    )
    expires_after: int | None = Field(
        default=None, gt=0, description="seconds after the job finishes before it is purged"
    )
    cascade: CascadeOptions | None = Field(
        default=None,
        description="re-ask documents under a confidence on a frontier route: "
        '{"below": 0.7, "model": "spill", "max_share": 0.2, "max_cost": 5}',
    )

    @field_validator("deadline")
    @classmethod
    def _future(cls, value: datetime | float | None) -> datetime | float | None:
        if isinstance(value, float | int) and value <= 0:
            raise ValueError("deadline in seconds must be positive")
        return value

    def deadline_at(self, now: datetime) -> datetime | None:
        if self.deadline is None:
            return None
        if isinstance(self.deadline, datetime):
            if self.deadline.tzinfo is None:
                raise InvalidInput(
                    "deadline needs a timezone (e.g. 2026-12-01T12:00:00Z)",
                    details=[{"field": "deadline"}],
                )
            return self.deadline
        return now + timedelta(seconds=float(self.deadline))


def prepare_spec(
    options: JobOptions, *, session: Session, settings: Settings
) -> tuple[JobSpec, list[str]]:
    """Validate labels and model; return the worker's spec and warnings to store with the job."""
    labels = validate_labels(options.labels, settings=settings)
    template = validate_label_template(options.label_template, settings=settings)
    if (
        options.instructions is not None
        and len(options.instructions) > settings.max_instructions_length
    ):
        raise InvalidInput(
            f"instructions are over {settings.max_instructions_length} characters "
            "(POSTROOM_MAX_INSTRUCTIONS_LENGTH)",
            details=[{"field": "instructions"}],
        )
    alias, model = choose_model(
        session=session, settings=settings, alias=options.model, mode=options.mode
    )
    warnings: list[str] = []
    if model.mode == "generative" and options.decoding == "score":
        collisions = label_collisions(
            settings.model_path(alias), tuple(label.name for label in labels)
        )
        for group in collisions:
            warnings.append(
                f"labels {', '.join(repr(n) for n in group)} start with the same token under "
                f"{alias}'s tokenizer; they are scored through option markers instead, which "
                "weakens confidence. Rename them to start differently for sharper scores."
            )
    spec = JobSpec(
        labels=labels,
        instructions=options.instructions or DEFAULT_INSTRUCTIONS,
        mode=model.mode,
        model=alias,
        revision=model.revision,
        decoding=options.decoding,
        label_template=template if model.mode == "embedding" else None,
        cascade=resolve_cascade(options.cascade, alias=alias, settings=settings),
    )
    return spec, warnings


def resolve_cascade(
    options: CascadeOptions | None, *, alias: str, settings: Settings
) -> Cascade | None:
    """The job's `cascade` as the worker runs it: `model` names the managed API ("spill", or
    POSTROOM_SPILL_MODEL's name) or a registry alias other than the job's own (422 otherwise)."""
    if options is None:
        return None
    name = options.model
    caps = {"below": options.below, "max_share": options.max_share, "max_cost": options.max_cost}
    if name == CASCADE_SPILL or (settings.spill_model and name == settings.spill_model):
        if not settings.spill_base_url:
            raise InvalidInput(
                "cascade.model: the managed API is not configured on this deployment "
                "(POSTROOM_SPILL_BASE_URL is empty); name a registry alias instead",
                details=[{"field": "cascade.model", "reason": "no managed API"}],
            )
        return Cascade(route="spill", model=settings.spill_model or "default", **caps)
    if name == alias:
        raise InvalidInput(
            f"cascade.model: {name!r} is the job's own model, so it would answer the same; "
            f"name a stronger alias or {CASCADE_SPILL!r} (the managed API)",
            details=[{"field": "cascade.model", "reason": "same as the job's model"}],
        )
    if name not in settings.models:
        known = sorted(settings.models)
        raise InvalidInput(
            f"cascade.model: {name!r} is neither {CASCADE_SPILL!r} (the managed API) nor an "
            f"alias in the registry; use one of: {', '.join([CASCADE_SPILL, *known])}",
            details=[{"field": "cascade.model", "registered": known}],
        )
    target = settings.models[name]
    return Cascade(route="gpu", model=name, mode=target.mode, revision=target.revision, **caps)
