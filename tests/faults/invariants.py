"""After a scenario: every accepted document has exactly one result (Jepsen's categories)."""

from __future__ import annotations

import collections
import json
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from postroom.db.models import Job, Result, Shard
from postroom.keys import result_shard_key
from postroom.storage import Storage


@dataclass
class Verdict:
    documents: int = 0
    results: int = 0
    lost: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    stuck: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {
            "documents": self.documents,
            "results": self.results,
            "lost": len(self.lost),
            "duplicated": len(self.duplicated),
            "unexpected": len(self.unexpected),
            "stuck": len(self.stuck),
        }

    @property
    def clean(self) -> bool:
        return not (self.lost or self.duplicated or self.unexpected or self.stuck)


def check(
    *,
    sessions: sessionmaker[Session],
    storage: Storage,
    expected: dict[uuid.UUID, set[str]],
    lease_seconds: int,
) -> Verdict:
    """Compare what was accepted with the Postgres rows and the S3 result objects."""
    verdict = Verdict()
    now = datetime.now(UTC)
    with sessions() as session:
        for job_id, ids in expected.items():
            verdict.documents += len(ids)
            job = session.get_one(Job, job_id)
            if job.status != "completed":
                verdict.stuck.append(f"job {job_id} is {job.status}")
            rows = session.scalars(select(Result.doc_id).where(Result.job_id == job_id)).all()
            verdict.results += len(rows)
            got = set(rows)
            verdict.lost += [f"{job_id}/{i} (no row)" for i in sorted(ids - got)]
            verdict.unexpected += [f"{job_id}/{i} (row)" for i in sorted(got - ids)]
            shards = session.execute(
                select(Shard.shard_no, Shard.state, Shard.lease_until).where(Shard.job_id == job_id)
            ).all()
            seen: collections.Counter[str] = collections.Counter()
            for shard_no, state, lease_until in shards:
                if (
                    state == "running"
                    and lease_until
                    and lease_until < now - timedelta(seconds=2 * lease_seconds)
                ):
                    verdict.stuck.append(f"{job_id}/{shard_no} lease ran out long ago")
                if state not in ("done", "failed", "cancelled", "split"):
                    verdict.stuck.append(f"{job_id}/{shard_no} is {state}")
                if state == "done":
                    body = storage.get_bytes(result_shard_key(job_id, shard_no))
                    seen.update(json.loads(line)["id"] for line in body.splitlines())
            verdict.duplicated += [f"{job_id}/{i} x{n} (S3)" for i, n in seen.items() if n > 1]
            verdict.lost += [f"{job_id}/{i} (S3)" for i in sorted(ids - set(seen))]
            verdict.unexpected += [f"{job_id}/{i} (S3)" for i in sorted(set(seen) - ids)]
    return verdict
