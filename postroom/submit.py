"""Job submission shared by every entry point (inline JSON, streamed upload, later the drop folder).

Order of work: validate options → stream documents through Intake, writing each full shard to S3 →
insert job + shards in one transaction (the caller commits) → publish after commit. A failure
before the commit leaves no job behind; shards in S3 under an uncommitted job id are deleted.
"""

from __future__ import annotations

import collections
import functools
import logging
import threading
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from postroom import tokens
from postroom.costs import estimate
from postroom.db.models import Job
from postroom.domain import (
    DEFAULT_INSTRUCTIONS,
    Decoding,
    JobSpec,
    Label,
    Mode,
    OnInvalid,
    SpillPolicy,
)
from postroom.errors import IdempotencyKeyReused, InvalidDocuments, InvalidInput
from postroom.intake import Intake
from postroom.jobs import NewJob, choose_model, create_job, validate_labels
from postroom.keys import input_shard_key, rejected_lines_key
from postroom.prompts import first_token_collisions, instructions_text
from postroom.queue import QUEUE_SPILL, gpu_queue
from postroom.settings import Settings
from postroom.storage import Storage, encode_jsonl

logger = logging.getLogger(__name__)


class JobOptions(BaseModel):
    """Everything about a job except its documents (the same for every entry point)."""

    model_config = ConfigDict(extra="forbid")

    labels: list[str | Label] = Field(description="label names, or {name, description} objects")
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
    max_spill_cost: float | None = Field(
        default=None, ge=0, description="the most this job may spend on the managed API, in $"
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
    )
    return spec, warnings


_TOKENIZER_LOCK = threading.Lock()


@functools.lru_cache(maxsize=4096)
def label_collisions(model_path: str, names: tuple[str, ...]) -> list[tuple[str, ...]]:
    # Requests run in a thread pool; a Rust tokenizer must not encode in two threads at once.
    with _TOKENIZER_LOCK:
        return first_token_collisions(tokens.load(model_path), names)


class ShardWriter:
    """Takes full shards from Intake and writes them to S3 on background threads, so reading the
    next lines overlaps the writes. At most `in_flight` shards wait in memory: a caller that sees
    `backlogged` calls `drain()` (blocking), and `flush()` once at the end, which raises the first
    write error."""

    def __init__(self, storage: Storage, job_id: uuid.UUID, *, in_flight: int = 4) -> None:
        self.storage = storage
        self.job_id = job_id
        self.in_flight = in_flight
        self.written = 0
        self._futures: collections.deque[Future[None]] = collections.deque()
        self._pool: ThreadPoolExecutor | None = None

    def __call__(self, shard_no: int, docs: list[dict[str, Any]]) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="shard-writer")
        self._futures.append(self._pool.submit(self._put, shard_no, docs))

    @property
    def backlogged(self) -> bool:
        return len(self._futures) >= self.in_flight

    def drain(self, keep: int | None = None) -> None:
        """Wait until at most `keep` writes (default: in_flight - 1) are still in flight."""
        keep = self.in_flight - 1 if keep is None else keep
        while len(self._futures) > keep:
            self._futures.popleft().result()
            self.written += 1

    def flush(self) -> None:
        """Wait for every write; raises the first that failed."""
        try:
            self.drain(0)
        finally:
            self._close()

    def discard(self) -> None:
        """Wait for the writes in flight (ignoring their errors) and delete what was written."""
        wrote = self.written > 0
        while self._futures:
            future = self._futures.popleft()
            wrote = wrote or (future.exception() is None)
        self._close()
        if wrote:
            self.storage.delete_prefix(f"inputs/{self.job_id}/")

    def _put(self, shard_no: int, docs: list[dict[str, Any]]) -> None:
        self.storage.put_bytes(input_shard_key(self.job_id, shard_no), encode_jsonl(docs))

    def _close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def new_intake(settings: Settings, writer: ShardWriter, *, on_invalid: OnInvalid) -> Intake:
    """An Intake for one job. A job refused on bad lines only shows the first few, so only
    those are kept; under on_invalid=skip each bad line becomes a failed result and all are."""
    keep = settings.max_error_details if on_invalid == "reject" else None
    return Intake(
        settings=settings, sink=writer, shard_size=settings.shard_size, keep_rejected=keep
    )


def check_intake(intake: Intake, options: JobOptions, *, settings: Settings) -> None:
    """Refuse the job when lines are bad and on_invalid=reject, or when nothing is left."""
    if intake.rejected_count and options.on_invalid == "reject":
        shown = intake.details()[: settings.max_error_details]
        more = intake.rejected_count - len(shown)
        raise InvalidDocuments(
            f"{intake.rejected_count} document line(s) are invalid; fix them or send "
            f"on_invalid=skip to run the job without them"
            + (f" (showing the first {len(shown)}, {more} more)" if more else ""),
            details=shown,
        )
    if intake.accepted + intake.rejected_count == 0:
        raise InvalidDocuments(
            'no documents: send at least one line {"id": …, "text": …}',
            details=[{"field": "documents", "reason": "empty"}],
        )


def finish_submission(
    *,
    session: Session,
    storage: Storage,
    tenant_id: uuid.UUID,
    job_id: uuid.UUID,
    spec: JobSpec,
    warnings: list[str],
    options: JobOptions,
    intake: Intake,
    writer: ShardWriter,
    idempotency_key: str | None,
    body_hash: str | None,
    settings: Settings,
) -> tuple[Job, bool]:
    """Insert the job (caller commits). Returns (job, created); an idempotent repeat returns the
    existing job and discards what this request wrote."""
    if idempotency_key:
        existing = _existing(session, tenant_id, idempotency_key, body_hash)
        if existing is not None:
            writer.discard()
            return existing, False
    if intake.rejected and options.on_invalid == "skip":
        storage.put_jsonl(
            rejected_lines_key(job_id),
            ({**r.detail(), "result_id": r.result_id} for r in intake.rejected),
        )
    prompt_chars = len(instructions_text(spec.labels, spec.instructions))
    new = NewJob(
        job_id=job_id,
        max_spill_cost=options.max_spill_cost,
        estimate=estimate(
            settings, docs=intake.accepted, chars=intake.chars, prompt_chars=prompt_chars
        ),
        tenant_id=tenant_id,
        spec=spec,
        spill=options.spill,
        deadline=options.deadline_at(datetime.now(UTC)),
        metadata=options.metadata,
        idempotency_key=idempotency_key,
        body_hash=body_hash,
        shard_sizes=intake.shard_sizes,
        rejected=intake.rejected,
        # `always` jobs go straight to the managed API; the router moves others when it must.
        queue=QUEUE_SPILL if options.spill == "always" else gpu_queue(spec.model),
        warnings=warnings,
    )
    try:
        with session.begin_nested():
            job = create_job(session=session, new=new)
    except IntegrityError:
        # Two requests with the same Idempotency-Key raced; the other one won.
        existing = _existing(session, tenant_id, idempotency_key or "", body_hash)
        if existing is None:
            raise
        writer.discard()
        return existing, False
    return job, True


def _existing(
    session: Session, tenant_id: uuid.UUID, key: str, body_hash: str | None
) -> Job | None:
    job = session.execute(
        select(Job).where(Job.tenant_id == tenant_id, Job.idempotency_key == key)
    ).scalar_one_or_none()
    if job is not None and job.body_hash != body_hash:
        raise IdempotencyKeyReused(
            "this Idempotency-Key was used with a different request body; use a new key",
            details=[{"field": "Idempotency-Key", "job_id": str(job.id)}],
        )
    return job
