"""Request and response models: the public wire contract of /v1/jobs."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from postroom.domain import Label
from postroom.job_options import JobOptions
from postroom.jobs import JobCounts


class JobCreate(JobOptions):
    """`POST /v1/jobs`: options plus inline documents (`{id, text, metadata?}` objects)."""

    documents: list[Any] | None = Field(
        default=None, description="inline documents; for large sets use POST /v1/jobs/upload"
    )
    input_uri: str | None = Field(
        default=None, description="s3://bucket/key.jsonl or .jsonl.gz, read instead of `documents`"
    )


class JobPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    status: str
    mode: str
    model: str
    revision: str
    decoding: str
    labels: list[Label]
    spill: str
    deadline: datetime | None
    metadata: dict[str, Any] | None
    counts: JobCounts
    shards: int
    warnings: list[str]
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    rate_docs_per_second: float | None
    eta_seconds: float | None
    max_spill_cost: float | None = None
    estimate: dict[str, Any] | None = Field(
        default=None, description="tokens and cost per route, estimated before the job started"
    )
    spend: dict[str, Any] = Field(
        default_factory=dict, description="docs, tokens and $ per route; total; $ per 1,000 docs"
    )
    router_note: str | None = None
    deadline_lost: bool = Field(
        default=False,
        description="the router expects the deadline to be missed on every route: the job runs "
        "after the jobs that can still meet theirs and nothing of it spills (router_note: why)",
    )
    cascade: dict[str, Any] | None = Field(
        default=None,
        description="the job's cascade and what it did: escalated, failed, agreed, agreement "
        "(share of answered escalations where both routes gave the same label), capped, cost",
    )
    priority: str = "normal"
    status_detail: str | None = Field(
        default=None, description="what an unfinished job waits for, e.g. a worker for its model"
    )
    results_url: str
    webhook_url: str | None = None
    expires_after: int | None = None


class JobList(BaseModel):
    data: list[JobPublic]
    next_cursor: str | None


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="allow")


class ErrorInfo(BaseModel):
    code: str
    message: str
    details: list[dict[str, Any]] = Field(default_factory=list)


class ErrorBody(BaseModel):
    error: ErrorInfo
