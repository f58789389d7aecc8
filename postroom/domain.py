"""Pure types shared by API and workers: statuses, job options, documents, result lines."""

from __future__ import annotations

import enum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class JobStatus(enum.StrEnum):
    validating = "validating"
    queued = "queued"
    running = "running"
    completed = "completed"
    failed = "failed"
    cancelled = "cancelled"


JOB_ACTIVE = (JobStatus.validating, JobStatus.queued, JobStatus.running)


class ShardState(enum.StrEnum):
    queued = "queued"
    running = "running"
    expired = "expired"
    done = "done"
    failed = "failed"
    cancelled = "cancelled"
    replaced = "split"  # split into smaller shards to isolate a poison document


SHARD_CLAIMABLE = (ShardState.queued, ShardState.expired)
SHARD_FINISHED = (ShardState.done, ShardState.failed, ShardState.cancelled, ShardState.replaced)
# The managed API's queue and route; each GPU model has its own queue (postroom.queue.gpu_queue).
QUEUE_SPILL = "spill"

Mode = Literal["generative", "embedding"]
Decoding = Literal["score", "choice"]
SpillPolicy = Literal["auto", "never", "always"]
Route = Literal["gpu", "spill", "batch"]
# The managed API's routes: one chat completion per document, or its batch endpoint (patient spill).
SPILL_ROUTES = ("spill", "batch")
# A job's claim priority (postroom.policy); a tenant may not ask above its maximum.
Priority = Literal["high", "normal", "low"]
OnInvalid = Literal["reject", "skip"]


class Label(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    description: str | None = None
    # A tuple keeps a label hashable (the OpenAI batch path keys tasks by their labels).
    examples: tuple[str, ...] | None = Field(
        default=None, description="a few short texts that belong to this label (few-shot)"
    )


CASCADE_SPILL = "spill"  # `cascade.model` naming the managed API (DESIGN §3) rather than an alias


class CascadeOptions(BaseModel):
    """`cascade` of a job: documents whose first answer's confidence is under `below` are asked
    again on a frontier route (the managed API, or another registry alias), the least confident
    first, within `max_share` of each shard's documents and `max_cost` dollars for the job."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    below: float = Field(
        gt=0, le=1, description="escalate documents whose first confidence is under this (0-1]"
    )
    model: str = Field(
        default=CASCADE_SPILL,
        min_length=1,
        description="'spill' (or POSTROOM_SPILL_MODEL's name): the managed API; else an alias",
    )
    max_share: float = Field(
        default=1.0, gt=0, le=1, description="at most this share of each shard's documents"
    )
    max_cost: float | None = Field(
        default=None, ge=0, description="the most the escalations of this job may cost, in $"
    )


class Cascade(BaseModel):
    """A job's cascade as the worker runs it: the options resolved to a route and model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    below: float
    route: Route
    model: str  # the managed API's model name, or a registry alias (route gpu)
    mode: Mode | None = None  # of the alias (route gpu)
    revision: str = ""
    max_share: float = 1.0
    max_cost: float | None = None


class JobSpec(BaseModel):
    """Everything a worker needs to classify a job's documents (stored as `jobs.spec`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    labels: list[Label]
    instructions: str
    mode: Mode
    model: str
    revision: str
    decoding: Decoding = "score"
    # Embedding mode: how a label without a description is phrased ({name}); None (jobs stored
    # before templates existed) embeds the bare name.
    label_template: str | None = None
    cascade: Cascade | None = None


class Document(BaseModel):
    """One input document as stored in an input shard line."""

    model_config = ConfigDict(extra="forbid")

    id: str
    text: str
    metadata: dict[str, Any] | None = None
    line: int = Field(description="1-based line (or list index + 1) in what the user sent")


class DocResult(BaseModel):
    """One document's outcome, as the classifier produces it (before storage)."""

    model_config = ConfigDict(extra="forbid")

    id: str
    label: str | None = None
    confidence: float | None = None
    distribution: dict[str, float] | None = None
    error: str | None = None
    truncated: bool = False
    tokens_in: int = 0
    tokens_out: int = 0
    # Cascade: the first answer when this one came from the frontier route, and why an
    # escalation failed when the first answer stands.
    first: FirstAnswer | None = None
    escalation_error: str | None = None
    # Set when the answer came from another route than its shard's (the cascade's frontier).
    route: str | None = None
    model: str | None = None
    revision: str | None = None


class FirstAnswer(BaseModel):
    """The first route's answer of an escalated document (`first` of its result)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    label: str | None
    confidence: float | None
    route: str
    model: str


DocResult.model_rebuild()


DEFAULT_INSTRUCTIONS = (
    "Classify the document into exactly one of the labels below. Answer with the label only."
)
