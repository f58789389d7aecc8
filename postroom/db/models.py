"""SQLAlchemy 2 models: tenants, api_keys, jobs, shards, results, workers, webhook_deliveries,
model_pins."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, ClassVar

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    false,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSONB, list[Any]: JSONB}


def _now() -> Any:
    return func.now()


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())
    # Webhooks: the default target of the tenant's jobs, and the secret they are signed with
    # (Standard Webhooks `whsec_…`, made on first use).
    webhook_url: Mapped[str | None] = mapped_column(Text)
    webhook_secret: Mapped[str | None] = mapped_column(String(100))
    # Claim policy and quotas; NULL = the deployment's setting (POSTROOM_TENANT_*, _QUOTA_*).
    weight: Mapped[float | None] = mapped_column(Float)
    max_priority: Mapped[str | None] = mapped_column(String(8))
    quota_docs_waiting: Mapped[int | None] = mapped_column(BigInteger)
    quota_docs_per_day: Mapped[int | None] = mapped_column(BigInteger)
    quota_running_shards: Mapped[int | None] = mapped_column(Integer)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    prefix: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("tenant_id", "idempotency_key", name="uq_jobs_tenant_idempotency_key"),
        Index("ix_jobs_tenant_created", "tenant_id", "created_at", "id"),
        Index(
            "ix_jobs_unexported",
            "finished_at",
            postgresql_where=text(
                "status = 'completed' AND results_exported_at IS NULL AND deleted_at IS NULL"
            ),
        ),
        Index("ix_jobs_deleted", "deleted_at", postgresql_where=text("deleted_at IS NOT NULL")),
        # The claim policy ranks the active jobs only.
        Index(
            "ix_jobs_active",
            "created_at",
            postgresql_where=text("status IN ('validating', 'queued', 'running')"),
        ),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    status: Mapped[str] = mapped_column(String(16))
    spec: Mapped[dict[str, Any]]
    model: Mapped[str] = mapped_column(String(100))
    spill: Mapped[str] = mapped_column(String(8), default="auto")
    deadline: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    priority: Mapped[str] = mapped_column(String(8), default="normal", server_default="normal")
    job_metadata: Mapped[dict[str, Any] | None] = mapped_column("metadata")
    warnings: Mapped[list[Any]] = mapped_column(default=list)
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    body_hash: Mapped[str | None] = mapped_column(String(64))
    total_docs: Mapped[int] = mapped_column(Integer, default=0)
    rejected_docs: Mapped[int] = mapped_column(Integer, default=0)
    shard_count: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    # Spill: the most this job may spend on the managed API, its estimate per route before it
    # starts, and the router's last word on it ("waiting for GPUs: spill budget reached").
    max_spill_cost: Mapped[float | None] = mapped_column(Float)
    estimate: Mapped[dict[str, Any] | None]
    router_note: Mapped[str | None] = mapped_column(Text)
    # The router's verdict that the deadline will be missed on every route: the claim policy then
    # runs the job after the jobs that can still meet theirs, and nothing of it spills.
    deadline_lost: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Set once results/{job}/results.parquet holds the finished job's results (the reaper
    # writes it; a crash before this leaves it to be written again).
    results_exported_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Set when DELETE /v1/jobs/{id} (or retention) began removing the job: from then on it
    # answers 404, and the purge removes its rows and objects, resuming after a crash.
    deleted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Where this job's events go (else the tenant's default), and how many seconds after it
    # finished the beat purges it (else POSTROOM_RETENTION_DAYS).
    webhook_url: Mapped[str | None] = mapped_column(Text)
    expires_after: Mapped[int | None] = mapped_column(Integer)
    # Its result rows go to a partition of their own (POSTROOM_RESULTS_OWN_PARTITION_DOCS), which
    # deleting the job drops.
    own_partition: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())


class Shard(Base):
    __tablename__ = "shards"
    __table_args__ = (
        Index("ix_shards_state_lease", "state", "lease_until"),
        Index(
            "ix_shards_unwritten",
            "finished_at",
            postgresql_where=text("state = 'done' AND results_written_at IS NULL"),
        ),
        # Claim by policy: a job's next claimable shard of a queue, and whether it has one.
        Index(
            "ix_shards_claimable",
            "job_id",
            "queue",
            "shard_no",
            postgresql_where=text("state IN ('queued', 'expired')"),
        ),
        # Fair share: each tenant's recent work.
        Index(
            "ix_shards_finished", "finished_at", postgresql_where=text("finished_at IS NOT NULL")
        ),
    )

    job_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    shard_no: Mapped[int] = mapped_column(Integer, primary_key=True)
    state: Mapped[str] = mapped_column(String(16))
    queue: Mapped[str] = mapped_column(String(100))
    doc_count: Mapped[int] = mapped_column(Integer)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    # Attempts given back cleanly after a transient failure (S3, database): they are not crashes,
    # so they do not count towards poison isolation.
    releases: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    worker: Mapped[str | None] = mapped_column(String(200))
    route: Mapped[str | None] = mapped_column(String(8))
    succeeded: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    tokens_in: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    tokens_out: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    error: Mapped[str | None] = mapped_column(Text)
    enqueued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Set once results/{job}/shard-N.jsonl holds the committed results (the S3 object is a
    # projection of the Postgres rows, written after the fenced commit).
    results_written_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Cascade (a job's `cascade`): documents of this shard asked again on the frontier route,
    # those whose escalation failed (they keep their first answer), those where both routes
    # agreed, those under the threshold left out by the caps, and the frontier's tokens.
    cascade_docs: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    cascade_failed: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    cascade_agreed: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    cascade_capped: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    cascade_tokens_in: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    cascade_tokens_out: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")


class Result(Base):
    __tablename__ = "results"
    __table_args__ = (
        # No foreign key to jobs: with a partition per big job its cascade would probe every
        # partition on each job deletion; the purge removes a job's rows before the job row.
        Index("ix_results_job_order", "job_id", "shard_no", "line"),  # a shard's results
        Index("ix_results_job_line", "job_id", "line"),  # a job's results in input order
        # One partition per UTC day of job creation, split by `part` (postroom.partitions):
        # retention drops a day's partition, deleting a big job drops its own.
        {"postgresql_partition_by": "RANGE (job_created_at)"},
    )

    job_id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    doc_id: Mapped[str] = mapped_column(String(512), primary_key=True)
    # The job's created_at, the partition key (so part of the primary key).
    job_created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), primary_key=True)
    # The sub-partition key: NIL (the day's shared partition) or, for a job with its own
    # partition, the job's id (postroom.partitions.results_part).
    part: Mapped[uuid.UUID] = mapped_column(
        primary_key=True, server_default=text("'00000000-0000-0000-0000-000000000000'::uuid")
    )
    shard_no: Mapped[int] = mapped_column(Integer)
    line: Mapped[int] = mapped_column(Integer)
    label: Mapped[str | None] = mapped_column(Text)
    confidence: Mapped[float | None] = mapped_column(Float)
    distribution: Mapped[dict[str, Any] | None]
    route: Mapped[str | None] = mapped_column(String(8))
    model: Mapped[str | None] = mapped_column(String(100))
    revision: Mapped[str | None] = mapped_column(String(200))
    error: Mapped[str | None] = mapped_column(Text)
    truncated: Mapped[bool] = mapped_column(Boolean, default=False)
    tokens_in: Mapped[int] = mapped_column(Integer, default=0)
    tokens_out: Mapped[int] = mapped_column(Integer, default=0)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())
    # Cascade: the first route's answer when the frontier's replaced it, and why an escalation
    # failed when the first answer stands.
    first_label: Mapped[str | None] = mapped_column(Text)
    first_confidence: Mapped[float | None] = mapped_column(Float)
    first_route: Mapped[str | None] = mapped_column(String(8))
    first_model: Mapped[str | None] = mapped_column(String(100))
    escalation_error: Mapped[str | None] = mapped_column(Text)


class Worker(Base):
    """One row per worker process, refreshed by its heartbeat."""

    __tablename__ = "workers"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    route: Mapped[str] = mapped_column(String(8))
    models: Mapped[list[Any]]
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())
    heartbeat_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())
    stats: Mapped[dict[str, Any]] = mapped_column(default=dict)
    docs_done: Mapped[int] = mapped_column(BigInteger, default=0)


class ModelPin(Base):
    """A registry alias pinned to the content digest of its files (`postroom model pin`): jobs
    record the digest as their revision, and a worker whose files differ refuses to start."""

    __tablename__ = "model_pins"

    alias: Mapped[str] = mapped_column(String(200), primary_key=True)
    digest: Mapped[str] = mapped_column(String(80))
    path: Mapped[str] = mapped_column(Text)
    pinned_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())


class WebhookDelivery(Base):
    """One event to one target: the outbox row, inserted in the transaction of the state change
    it reports, then sent (and retried) by the beat until delivered or out of time. Its id is
    the `webhook-id` (the same on every retry, so receivers can dedupe)."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        Index("ix_webhook_deliveries_job", "job_id", "created_at"),
        Index(
            "ix_webhook_deliveries_due",
            "next_attempt_at",
            postgresql_where=text("state = 'pending'"),
        ),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    type: Mapped[str] = mapped_column(String(32))
    url: Mapped[str] = mapped_column(Text)
    payload: Mapped[dict[str, Any]]
    state: Mapped[str] = mapped_column(String(12), default="pending")  # delivered, failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_status: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    # Every attempt: {at, attempt, status, error, ms}
    log: Mapped[list[Any]] = mapped_column(default=list)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class SpillBatch(Base):
    """A shard attempt sent to a provider's batch endpoint (patient spill, postroom.spill_batches).

    The row is written before anything is sent, and the remote batch id recorded as soon as the
    provider returns it, so the beat's poll acts on every batch it ever submitted: `submitting`
    → `submitted` → `collected` (results committed) or `returned` (expired, failed or refused: the
    shard went back to the router) or `superseded` (another attempt finished the shard).
    """

    __tablename__ = "spill_batches"
    __table_args__ = (
        Index("ix_spill_batches_open", "state", postgresql_where=text("state = 'submitted'")),
    )

    job_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    shard_no: Mapped[int] = mapped_column(Integer, primary_key=True)
    attempt: Mapped[int] = mapped_column(Integer, primary_key=True)
    state: Mapped[str] = mapped_column(String(16))
    remote_batch_id: Mapped[str | None] = mapped_column(String(200))
    input_file_id: Mapped[str | None] = mapped_column(String(200))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    note: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())
