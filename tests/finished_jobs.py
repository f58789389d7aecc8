"""A finished job made straight in Postgres (and optionally S3) without a worker: shards claimed,
results upserted and shards finished through the same functions a worker calls, so the job is
`completed` exactly as a worker would leave it. Result formats, deletion and webhooks start here."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from postroom.db.models import Job
from postroom.domain import DocResult, FirstAnswer
from postroom.jobs import work_order
from postroom.keys import input_shard_key, result_shard_key
from postroom.results import result_line, upsert_results
from postroom.shards import claim_shard, finish_shard, mark_results_written
from postroom.storage import Storage, encode_jsonl
from tests.postroom.jobrows import SPEC, make_job

LABELS = [label.name for label in SPEC.labels]  # "a", "b"


def doc_result(n: int) -> DocResult:
    """Document n's result: every 17th failed, the rest alternate a and b with a distribution;
    of those, every 13th was escalated by a cascade (its first answer kept) and every 19th's
    escalation failed (its first answer stands)."""
    if n % 17 == 0:
        return DocResult(id=f"doc-{n}", error=f'too_long: document {n}, "quoted", has, commas')
    p = round(0.5 + (n % 50) / 100, 6)
    label, other = ("a", "b") if n % 2 else ("b", "a")
    if n % 13 == 0:
        first = FirstAnswer(label=other, confidence=0.5, route="gpu", model=SPEC.model)
        return DocResult(
            id=f"doc-{n}", label=label, confidence=0.9, first=first, route="spill", model="gpt"
        )
    return DocResult(
        id=f"doc-{n}",
        label=label,
        confidence=p,
        distribution={label: p, other: 1 - p},
        escalation_error="escalation_failed: 429, 429, 429" if n % 19 == 0 else None,
    )


def finished_job(
    sessions: sessionmaker[Session],
    *,
    tenant: str,
    docs: int,
    shard_size: int = 1000,
    storage: Storage | None = None,
    created_days_ago: int = 0,
    result: Callable[[int], DocResult] = doc_result,
    own_partition: bool = False,
) -> uuid.UUID:
    """A completed job of `docs` documents for `tenant`; with `storage`, its input and result
    shard objects are written too (what a real job leaves in S3). `created_days_ago` backdates
    the job (its result rows then go to that day's partition, made on demand if missing).
    `result` makes document n's result (every one failed: the job ends `failed`).
    `own_partition`: its rows go to a partition of their own, as a big job's do."""
    sizes = tuple(min(shard_size, docs - start) for start in range(0, docs, shard_size))
    job_id = make_job(sessions, sizes=sizes, tenant=tenant, own_partition=own_partition)
    if created_days_ago:
        created = datetime.now(UTC) - timedelta(days=created_days_ago)
        with sessions.begin() as session:
            session.execute(update(Job).where(Job.id == job_id).values(created_at=created))
    for shard_no, start in enumerate(range(0, docs, shard_size)):
        results = [(n + 1, result(n)) for n in range(start, start + sizes[shard_no])]
        if storage is not None:
            inputs = [{"id": r.id, "text": f"text {line}", "line": line} for line, r in results]
            storage.put_bytes(input_shard_key(job_id, shard_no), encode_jsonl(inputs))
        with sessions.begin() as session:
            claimed = claim_shard(
                session=session,
                job_id=job_id,
                shard_no=shard_no,
                worker="test",
                lease_seconds=60,
                route="gpu",
            )
            assert claimed is not None
            fence = {"job_id": job_id, "shard_no": shard_no, "attempt": claimed.attempt}
            order = work_order(session=session, job_id=job_id)
            upsert_results(
                session=session,
                **fence,
                route="gpu",
                model=SPEC.model,
                revision=SPEC.revision,
                results=results,
                job_created_at=order.created_at,
                part=order.part,
            )
            failed = sum(1 for _, r in results if r.error)
            assert finish_shard(
                session=session,
                **fence,
                succeeded=len(results) - failed,
                failed=failed,
                route="gpu",
            )
        if storage is not None:
            lines = [
                result_line(r, route="gpu", model=SPEC.model, revision=SPEC.revision)
                for _, r in results
            ]
            storage.put_bytes(result_shard_key(job_id, shard_no), encode_jsonl(lines))
        with sessions.begin() as session:
            mark_results_written(session=session, job_id=job_id, shard_no=shard_no)
    return job_id
