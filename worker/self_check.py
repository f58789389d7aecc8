"""Is it the documents or the worker? An attempt that raised counts against its shard like a crash
(three and the shard is split to corner a poison document), which is right when a document does
it and wrong when the worker does it to every shard (a bad deploy, an engine left in a bad state):
then a whole job's good documents would end as poison within seconds. So before counting it,
the worker classifies one neutral document through the same classifier and model. When that
raises too, the worker gives back every shard it holds without counting them and exits for its
supervisor to restart it."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, tuple_
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from postroom.db.models import Shard
from postroom.domain import DEFAULT_INSTRUCTIONS, DocResult, JobSpec, Label
from postroom.errors import EngineDeadError
from postroom.metrics import SHARDS
from postroom.queue import Celery, publish_and_record
from postroom.shards import release_shard

if TYPE_CHECKING:  # the runtime builds BrokenClassifier from here
    from worker.classifier import Classifier
    from worker.runtime import Runtime

logger = logging.getLogger(__name__)

PROBE_DOC = {"id": "self-check", "text": "Hello, I have a question about my account.", "line": 1}
# How long a broken worker waits for its other threads' claims before giving its shards back.
CLAIMS_WAIT_SECONDS = 30.0
PROBE_LABELS = [Label(name="question"), Label(name="complaint")]


class WorkerBroken(EngineDeadError):
    """This worker cannot classify even the neutral document: it exits (70) to be restarted,
    like a worker whose engine died, but its shards were given back first, uncounted."""


def self_check(classifier: Classifier, spec: JobSpec) -> Exception | None:
    """What classifying the neutral document with the job's model raised, or None."""
    probe = spec.model_copy(
        update={"labels": PROBE_LABELS, "instructions": DEFAULT_INSTRUCTIONS, "cascade": None}
    )
    # Classifiers cache what they prepare per job: one probe "job" per probe spec.
    job_id = uuid.uuid5(uuid.NAMESPACE_URL, "postroom-self-check:" + probe.model_dump_json())
    try:
        classifier.classify(job_id=job_id, spec=probe, shard="self-check", docs=[PROBE_DOC])
    except Exception as e:  # whatever it is, this worker cannot classify
        return e
    return None


def give_back_all(runtime: Runtime, celery: Celery) -> int:
    """Release every shard this worker holds (not counted as crashes) and ring their doorbells,
    since the process is about to exit. Fenced: a shard another worker took meanwhile is left.
    Claims close first, so no shard claimed by another thread meanwhile is left out (counted)."""
    if not runtime.claiming.close(timeout=CLAIMS_WAIT_SECONDS):
        logger.warning(
            "a claim still under way after %.0f s; a shard it took will wait out its lease",
            CLAIMS_WAIT_SECONDS,
        )
    held = runtime.leases()
    if not held:
        return 0
    try:
        with runtime.sessions.begin() as session:
            released = [
                (job, shard)
                for job, shard, attempt in held
                if release_shard(session=session, job_id=job, shard_no=shard, attempt=attempt)
            ]
            queues = _queues(session, released)
        publish_and_record(celery, runtime.sessions, queues)
    except OperationalError as e:  # the database is down too: the leases will run out instead
        logger.warning("could not give the shards back (%s); their leases will expire", e)
        return 0
    SHARDS.labels(runtime.route, "released").inc(len(released))
    return len(released)


def _queues(
    session: Session, keys: Sequence[tuple[uuid.UUID, int]]
) -> list[tuple[uuid.UUID, int, str]]:
    if not keys:
        return []
    rows = session.execute(
        select(Shard.job_id, Shard.shard_no, Shard.queue).where(
            tuple_(Shard.job_id, Shard.shard_no).in_(keys)
        )
    ).all()
    return [(job, shard, queue) for job, shard, queue in rows]


class BrokenClassifier:
    """Fault injection (tests only, POSTROOM_FAULT_BROKEN_WORKER): every call raises, as a
    worker from a broken deploy would."""

    route = "gpu"

    def classify(
        self, *, job_id: uuid.UUID, spec: JobSpec, shard: str, docs: Sequence[dict[str, Any]]
    ) -> list[DocResult]:
        raise RuntimeError("fault injection: this worker is broken")
