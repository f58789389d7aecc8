"""Job submission: one path for every way in (inline, upload, `input_uri`, the drop folder, an
OpenAI batch).

A `Submission` is one job on its way in: prepare (labels, model, spec) → feed documents (parsed
objects, or a byte stream of JSONL, gzip or not) → seal (refuse bad lines or none, wait for the
shard writes) → record (job and shard rows, in the caller's transaction) → publish (after the
caller's commit). Until it is recorded, a failure deletes what it wrote to S3: use it as a context
manager (`with` or `async with`), so no half job is left behind whatever goes wrong.

An upload may start early (`start_early`): the job is recorded `validating` with its first shard
and every shard runs as soon as it is in S3, so the engine works while the rest still streams. A
failure then withdraws the job (deleted, its rows and objects purged), so the caller still sees a
refused request and no job.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from postroom.costs import estimate
from postroom.db.models import Job
from postroom.domain import (
    QUEUE_SPILL,
    JobSpec,
    OnInvalid,
)
from postroom.early_start import EarlyStart
from postroom.errors import IdempotencyKeyReused, InvalidDocuments
from postroom.intake import Intake
from postroom.job_options import JobOptions, prepare_spec
from postroom.jobs import NewJob, create_job, seal_received_job
from postroom.keys import rejected_lines_key
from postroom.lines import LineStream, StreamLimits
from postroom.prompts import instructions_text
from postroom.queue import Celery, gpu_queue, publish_job
from postroom.quotas import admit_job
from postroom.settings import Settings
from postroom.shard_writer import ShardWriter
from postroom.storage import Storage
from postroom.webhook_targets import check_webhook_url

logger = logging.getLogger(__name__)


class Submission(EarlyStart):
    """One job on its way in; see the module docstring for the order of the steps."""

    def __init__(
        self,
        *,
        storage: Storage,
        settings: Settings,
        on_invalid: OnInvalid = "reject",
        job_id: uuid.UUID | None = None,
    ) -> None:
        self.job_id = job_id or uuid.uuid4()
        self.storage = storage
        self.settings = settings
        self.on_invalid = on_invalid
        self.writer = ShardWriter(storage, self.job_id)
        # A job refused on bad lines only shows the first few, so only those are kept; under
        # on_invalid=skip each bad line becomes a failed result and all are.
        keep = settings.max_error_details if on_invalid == "reject" else None
        self.intake = Intake(
            settings=settings, sink=self.writer, shard_size=settings.shard_size, keep_rejected=keep
        )
        self.options: JobOptions | None = None
        self.spec: JobSpec | None = None
        self.warnings: list[str] = []
        self.job: Job | None = None
        self.created = False
        self._stream: LineStream | None = None
        self._sealed = False  # committed and published: a later error withdraws nothing
        self._init_early()

    @classmethod
    def start(
        cls,
        options: JobOptions,
        *,
        session: Session,
        storage: Storage,
        settings: Settings,
        job_id: uuid.UUID | None = None,
    ) -> Submission:
        """A submission whose options are known up front (all but the OpenAI batch)."""
        submission = cls(
            storage=storage, settings=settings, on_invalid=options.on_invalid, job_id=job_id
        )
        submission.prepare(options, session=session)
        return submission

    def prepare(self, options: JobOptions, *, session: Session) -> None:
        """Check labels, instructions and model (raises InvalidInput); the job's spec."""
        check_webhook_url(options.webhook_url, allow_private=self.settings.webhook_allow_private)
        self.spec, self.warnings = prepare_spec(options, session=session, settings=self.settings)
        self.options = options

    # -- feeding

    def add(self, document: Any) -> None:
        """One document as a parsed object (parse with `jsonsafe.parse_json`, so duplicate keys
        and NaN are caught); blocks while too many shard writes are in flight."""
        self.intake.add_object(document)
        if self.writer.backlogged:
            self.writer.drain()

    def open_stream(self, *, gzip: bool, name: str, limits: StreamLimits | None = None) -> None:
        """Get ready for `feed`: JSONL bytes (gzip or not), within `limits` (default: those of
        uploads, POSTROOM_MAX_UPLOAD_BYTES and POSTROOM_MAX_GZIP_RATIO)."""
        self._stream = LineStream(self.intake, gzip=gzip, name=name, limits=limits)

    def feed(self, chunk: bytes, *, wait: bool = True) -> None:
        """The next bytes of the stream. With `wait=False` (an event loop) it never blocks: the
        caller drains in a thread while `backlogged`."""
        assert self._stream is not None, "open_stream() first"
        self._stream.feed(chunk)
        self._fed_bytes += len(chunk)
        if wait and self.writer.backlogged:
            self.writer.drain()

    @property
    def backlogged(self) -> bool:
        return self.writer.backlogged

    def drain(self) -> None:
        self.writer.drain()

    # -- sealing, recording, publishing

    def seal(self) -> None:
        """No more documents: refuse the job when lines are bad (on_invalid=reject) or none are
        left, and wait for every shard write (raises the first that failed)."""
        if self._stream is not None:
            self._stream.end()
        self.intake.finish()
        self.check()
        self.writer.flush()

    def check(self) -> None:
        """Raise InvalidDocuments when the job would be refused on what was fed so far."""
        intake, settings = self.intake, self.settings
        if intake.rejected_count and self.on_invalid == "reject":
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

    def record(
        self,
        *,
        session: Session,
        tenant_id: uuid.UUID,
        idempotency_key: str | None = None,
        body_hash: str | None = None,
    ) -> Job:
        """Insert the job, its shards and the failed results of skipped lines (the caller
        commits). `created` says whether it is new: an idempotent repeat (the same key and body)
        returns the existing job and discards what this submission wrote."""
        intake = self.intake
        if self.received_early:  # started early: seal what streamed in
            with self._lock:
                self._closing = True  # no more early publishing; the rest is published below
            job = session.get(Job, self.job_id, populate_existing=True)
            assert job is not None
            self._admit(
                session=session,
                tenant_id=tenant_id,
                docs=sum(intake.shard_sizes[self.early_shards :]) + len(intake.rejected),
            )
            self._store_rejected()
            seal_received_job(
                session=session,
                job=job,
                new=self._new_job(tenant_id, None, None),
                first=self.early_shards,
            )
            self.job, self.created = job, True
            return job
        if idempotency_key:
            existing = _existing(session, tenant_id, idempotency_key, body_hash)
            if existing is not None:
                return self._repeat_of(existing)
        self._admit(
            session=session, tenant_id=tenant_id, docs=intake.accepted + len(intake.rejected)
        )
        self._store_rejected()
        new = self._new_job(tenant_id, idempotency_key, body_hash)
        try:
            with session.begin_nested():
                self.job = create_job(session=session, new=new)
        except IntegrityError:
            # Two requests with the same Idempotency-Key raced; the other one won.
            existing = _existing(session, tenant_id, idempotency_key or "", body_hash)
            if existing is None:
                raise
            return self._repeat_of(existing)
        self.created = True
        return self.job

    def _admit(self, *, session: Session, tenant_id: uuid.UUID, docs: int) -> None:
        assert self.options is not None, "prepare() first"
        admit_job(
            session=session,
            tenant_id=tenant_id,
            docs=docs,
            priority=self.options.priority,
            settings=self.settings,
        )

    def _store_rejected(self) -> None:
        """The bad lines an on_invalid=skip job runs without, for `GET …/results`."""
        intake = self.intake
        if intake.rejected and self.on_invalid == "skip":
            self.storage.put_jsonl(
                rejected_lines_key(self.job_id),
                ({**r.detail(), "result_id": r.result_id} for r in intake.rejected),
            )

    def _queue(self) -> str:
        """`always` jobs go straight to the managed API; the router moves others when it must."""
        assert self.options is not None
        assert self.spec is not None
        return QUEUE_SPILL if self.options.spill == "always" else gpu_queue(self.spec.model)

    def _new_job(
        self,
        tenant_id: uuid.UUID,
        idempotency_key: str | None,
        body_hash: str | None,
        *,
        expected_docs: int | None = None,
    ) -> NewJob:
        assert self.options is not None, "prepare() first"
        assert self.spec is not None
        options, spec, intake = self.options, self.spec, self.intake
        prompt_chars = len(instructions_text(spec.labels, spec.instructions))
        return NewJob(
            job_id=self.job_id,
            max_spill_cost=options.max_spill_cost,
            webhook_url=options.webhook_url,
            expires_after=options.expires_after,
            estimate=estimate(
                self.settings, docs=intake.accepted, chars=intake.chars, prompt_chars=prompt_chars
            ),
            tenant_id=tenant_id,
            spec=spec,
            spill=options.spill,
            priority=options.priority,
            deadline=options.deadline_at(datetime.now(UTC)),
            metadata=options.metadata,
            idempotency_key=idempotency_key,
            body_hash=body_hash,
            shard_sizes=intake.shard_sizes,
            rejected=intake.rejected,
            queue=self._queue(),
            warnings=self.warnings,
            own_partition=0
            < self.settings.results_own_partition_docs
            <= (expected_docs or intake.accepted + len(intake.rejected)),
        )

    def publish(self, *, session: Session, celery: Celery) -> int:
        """Ring the doorbells of a job this submission created; call after the commit (a worker
        must find the shard it is told about), then commit again to record them. A broker
        outage leaves the shards to the reaper."""
        if not self.created:
            return 0
        self._sealed = True
        return publish_job(session=session, celery=celery, job_id=self.job_id)

    def discard(self) -> None:
        """Delete what this submission wrote to S3 (nothing is recorded yet)."""
        self.writer.discard()

    def _repeat_of(self, existing: Job) -> Job:
        self.discard()
        self.job, self.created = existing, False
        return existing

    def __enter__(self) -> Submission:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        if kind is None:
            return
        if self.received_early and not self._sealed:
            self._withdraw()
        elif self.job is None:
            self.discard()

    async def __aenter__(self) -> Submission:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, *_: object) -> None:
        # Discarding waits for writes in flight: off the event loop.
        await asyncio.to_thread(self.__exit__, kind)


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
