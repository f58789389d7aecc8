"""Early start: an upload's shards run while the rest of it still streams.

The first shard that lands in S3 records the job, `validating`; every later one is recorded and
announced as it lands (on the shard writer's thread), so the engine works during the upload. A
failed upload withdraws the job (deleted; the beat's purge removes its rows and S3 objects), so the
caller still sees a refused request and no job. `Submission` (postroom.submit) mixes this in.
"""

from __future__ import annotations

import logging
import threading
import uuid
from typing import TYPE_CHECKING

from sqlalchemy.orm import Session, sessionmaker

from postroom.deletion import mark_deleted
from postroom.errors import PayloadTooLarge
from postroom.jobs import add_received_shards, create_job
from postroom.queue import Celery, publish_job
from postroom.shard_numbers import EARLY_SHARD_BASE, early_start_fits

if TYPE_CHECKING:
    from postroom.db.models import Job
    from postroom.domain import OnInvalid
    from postroom.intake import Intake
    from postroom.jobs import NewJob
    from postroom.settings import Settings
    from postroom.shard_writer import ShardWriter

logger = logging.getLogger(__name__)


class EarlyStart:
    """The early-start half of a `Submission`: the state and steps that record shards while the
    upload streams."""

    # What the submission provides (postroom.submit.Submission).
    job_id: uuid.UUID
    job: Job | None
    settings: Settings
    on_invalid: OnInvalid
    writer: ShardWriter
    intake: Intake

    def _admit(self, *, session: Session, tenant_id: uuid.UUID, docs: int) -> None:
        raise NotImplementedError

    def _new_job(
        self,
        tenant_id: uuid.UUID,
        idempotency_key: str | None,
        body_hash: str | None,
        *,
        expected_docs: int | None = None,
    ) -> NewJob:
        raise NotImplementedError

    def _queue(self) -> str:
        raise NotImplementedError

    def _init_early(self) -> None:
        # Where to record shards while the upload streams, and how many root shards are
        # recorded so far.
        self._early: tuple[sessionmaker[Session], Celery, uuid.UUID] | None = None
        self._sessions: sessionmaker[Session] | None = None
        self.early_shards = 0
        self.received_early = False  # the job row exists, `validating`, since the first shard
        self._closing = False  # record() began: the shard writer publishes no more
        self._lock = threading.Lock()  # early publishing (writer threads) vs sealing
        self._body_bytes: int | None = None
        self._fed_bytes = 0

    def start_early(
        self,
        *,
        sessions: sessionmaker[Session],
        celery: Celery,
        tenant_id: uuid.UUID,
        body_bytes: int | None = None,
    ) -> bool:
        """Run shards while the upload streams: each shard is recorded and announced as soon as
        it is in S3 (on the shard writer's thread), the first one with the job, `validating`.
        Off when POSTROOM_UPLOAD_EARLY_START is false or split parts' numbers could overflow;
        the caller keeps requests with an Idempotency-Key on the plain path (a repeat must not
        run twice). `body_bytes` (the request's Content-Length) lets the job's size be foreseen
        from its first shards: a job heading past POSTROOM_RESULTS_OWN_PARTITION_DOCS gets its
        results partition of its own; without it the job shares the day's."""
        self._body_bytes = body_bytes
        fits = early_start_fits(
            shard_size=self.settings.shard_size, fanout=self.settings.split_fanout
        )
        if self.settings.upload_early_start and fits:
            self._early = (sessions, celery, tenant_id)
            self._sessions = sessions
            self.writer.on_landed = self.publish_landed
        return self._early is not None

    @property
    def early(self) -> bool:
        return self._early is not None

    def publish_landed(self) -> int:
        """Record the shards that reached S3 since the last call and ring their doorbells (the
        first call records the job). Nothing once a line is bad under on_invalid=reject (the job
        will be refused), after the job was cancelled, or after a failure here (raised: it fails
        the shard write, so the upload is refused at its end and the job withdrawn). Returns how
        many shards were published."""
        with self._lock:
            if self._early is None or self._closing:
                return 0
            try:
                return self._publish_landed(*self._early)
            except BaseException:
                self._early = None
                raise

    def _publish_landed(
        self, sessions: sessionmaker[Session], celery: Celery, tenant_id: uuid.UUID
    ) -> int:
        ready = self.writer.landed
        if ready <= self.early_shards:
            return 0
        if self.intake.rejected_count and self.on_invalid == "reject":
            return 0
        if ready > EARLY_SHARD_BASE:
            raise PayloadTooLarge(
                f"more than {EARLY_SHARD_BASE * self.settings.shard_size:,} documents in one "
                "upload; split it into several jobs",
                details=[{"field": "documents"}],
            )
        sizes = self.writer.sizes[self.early_shards : ready]
        with sessions() as session:
            self._admit(session=session, tenant_id=tenant_id, docs=sum(sizes))
            if self.job is None:
                new = self._new_job(tenant_id, None, None, expected_docs=self._foreseen_docs())
                self.job = create_job(session=session, new=new, receiving=True)
                self.received_early = True
            added = add_received_shards(
                session=session,
                job_id=self.job_id,
                first=self.early_shards,
                sizes=sizes,
                queue=self._queue(),
            )
            session.commit()
            if not added:  # cancelled or deleted while it streamed: the rest is not run
                self._early = None
                return 0
            self.early_shards = ready
            published = publish_job(session=session, celery=celery, job_id=self.job_id)
            session.commit()
        return published

    def _withdraw(self) -> None:
        """The upload of an early-started job failed: delete the job (404 from now on; the
        beat's purge removes its rows and S3 objects) and what this submission wrote."""
        assert self._sessions is not None
        with self._sessions() as session:
            mark_deleted(session=session, tenant_id=None, job_id=self.job_id)
            session.commit()
        logger.info("job %s withdrawn: its upload failed after shards started", self.job_id)
        self.writer.discard()

    def _foreseen_docs(self) -> int:
        """The documents the whole upload will hold, judged from its bytes so far; 0 when its
        length is not declared (a chunked body)."""
        if not self._body_bytes or not self._fed_bytes:
            return 0
        return int(self.intake.accepted * self._body_bytes / self._fed_bytes)
