"""SQLAlchemy model of the S3 drop folder: one row per object version seen in the inbox."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import (
    BigInteger,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    func,
)
from sqlalchemy.orm import Mapped, mapped_column

from postroom.db.models import Base


class InboxObject(Base):
    """One object version (bucket, key, ETag) of `<prefix>/inbox/<folder>/<file>`.

    `id` is derived from (bucket, key, ETag) and is also the id of the job it becomes, so the
    unique constraint and the job's primary key both stand between an object and a second job.
    `attempt` is the fencing token of whoever holds the row (ingest or finalize), `lease_until`
    when that claim may be taken over.
    """

    __tablename__ = "inbox_objects"
    __table_args__ = (
        UniqueConstraint("bucket", "key", "etag", name="uq_inbox_objects_bucket_key_etag"),
        Index("ix_inbox_objects_state_lease", "state", "lease_until"),
        Index("ix_inbox_objects_seen_at", "seen_at"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    bucket: Mapped[str] = mapped_column(String(255))
    key: Mapped[str] = mapped_column(String(1024))
    etag: Mapped[str] = mapped_column(String(200))
    size: Mapped[int] = mapped_column(BigInteger)
    folder: Mapped[str] = mapped_column(String(1024))
    file: Mapped[str] = mapped_column(String(1024))
    state: Mapped[str] = mapped_column(String(16))
    job_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"))
    reason: Mapped[str | None] = mapped_column(Text)
    # The outbox results' format, from job.json's `results_format`: jsonl (default) or parquet.
    results_format: Mapped[str] = mapped_column(String(8), default="jsonl", server_default="jsonl")
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    seen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    ingested_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
