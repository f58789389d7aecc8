"""Patient spill: a spilled shard of a job whose deadline leaves more than the provider's
completion window goes through its OpenAI-style batch endpoint (`/v1/files` + `/v1/batches`, at
`POSTROOM_SPILL_BATCH_DISCOUNT` of the price) instead of one chat completion per document.

The spill worker submits (worker.tasks) and parks the shard: it stays `running` under its attempt,
with a lease past the batch's window, so nothing else claims it. The beat polls
(control.spill_batches): a completed batch's output becomes the shard's results through the same
fenced commit as any shard (route `batch`); a batch that expires, fails or is cancelled gives the
shard back to the router, and its next attempt classifies one document at a time. Every step is
keyed by (job, shard, attempt): the row is written before anything is sent, the remote id recorded
as soon as it is known, and collecting twice rewrites the same result rows.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any, Final

import openai
from sqlalchemy import func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from postroom.db.models import Shard, SpillBatch
from postroom.domain import DocResult, JobSpec, ShardState
from postroom.prompts import instructions_text
from postroom.settings import Settings
from postroom.spill_answers import answer_confidence, parse_answer, response_schema

ROUTE_BATCH = "batch"
ENDPOINT: Final = "/v1/chat/completions"
REMOTE_DONE = "completed"
REMOTE_GAVE_UP = ("failed", "expired", "cancelled")
# A parked shard's lease runs this long past its batch's window, so the poll (not the reaper) is
# what ends it.
PARK_GRACE = timedelta(hours=1)
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400}


def window_seconds(window: str) -> int:
    """`24h`, `90m`, `2d`, `30s` → seconds."""
    match = re.fullmatch(r"([1-9][0-9]*)([smhd])", window)
    if match is None:
        raise ValueError(f"completion window {window!r} is not <number><s|m|h|d>")
    return int(match[1]) * _UNITS[match[2]]


def is_patient(settings: Settings, deadline: datetime | None, now: datetime) -> bool:
    """Whether a spilled shard may wait for a batch: the job's deadline is further away than the
    provider's completion window."""
    if not settings.spill_batch_enabled or deadline is None:
        return False
    if not (settings.spill_batch_base_url or settings.spill_base_url):
        return False  # no provider configured: never fall back to the SDK's default URL
    window = window_seconds(settings.spill_batch_completion_window)
    return (deadline - now).total_seconds() > window


def batch_client(settings: Settings) -> openai.OpenAI:
    key = settings.spill_batch_api_key.get_secret_value() or (
        settings.spill_api_key.get_secret_value()
    )
    return openai.OpenAI(
        base_url=settings.spill_batch_base_url or settings.spill_base_url,
        api_key=key or "none",
        max_retries=2,
        timeout=settings.spill_call_deadline_seconds,
    )


def shard_key(job_id: uuid.UUID, shard_no: int, attempt: int) -> str:
    """The batch's `metadata.postroom_shard`: which shard attempt it carries."""
    return f"{job_id}/{shard_no}/{attempt}"


def request_lines(settings: Settings, spec: JobSpec, docs: Sequence[dict[str, Any]]) -> bytes:
    """The batch input: one chat-completions request per document (the spill worker's prompt and
    label-set schema), `custom_id` = the document id."""
    system = instructions_text(spec.labels, spec.instructions)
    schema = response_schema([label.name for label in spec.labels])
    out = []
    for doc in docs:
        body = {
            "model": settings.spill_model or "default",
            "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": str(doc["text"])},
            ],
            "response_format": schema,
            "logprobs": True,
            "temperature": 0,
            "max_tokens": settings.spill_max_tokens,
        }
        line = {"custom_id": str(doc["id"]), "method": "POST", "url": ENDPOINT, "body": body}
        out.append(json.dumps(line, ensure_ascii=False))
    return ("\n".join(out) + "\n").encode()


def read_output(
    docs: Sequence[dict[str, Any]],
    labels: Sequence[str],
    outputs: Iterable[dict[str, Any]],
    errors: Iterable[dict[str, Any]],
) -> list[DocResult]:
    """One result per document of the shard, in its order, from a batch's output and error lines:
    an answer in the label set, else the document fails with the reason (never a wrong label)."""
    by_id: dict[str, DocResult] = {}
    for line in errors:
        error = line.get("error") or {}
        by_id[str(line.get("custom_id"))] = DocResult(
            id=str(line.get("custom_id")),
            error=f"batch_request_failed: {error.get('code')}: {error.get('message')}",
        )
    for line in outputs:
        doc_id = str(line.get("custom_id"))
        response = line.get("response") or {}
        body = response.get("body") or {}
        usage = body.get("usage") or {}
        tokens = {
            "tokens_in": int(usage.get("prompt_tokens") or 0),
            "tokens_out": int(usage.get("completion_tokens") or 0),
        }
        choices = body.get("choices") or []
        if response.get("status_code") != 200 or not choices:
            status = response.get("status_code")
            by_id[doc_id] = DocResult(id=doc_id, error=f"batch_request_failed: {status}", **tokens)
            continue
        choice = choices[0]
        label, problem = parse_answer((choice.get("message") or {}).get("content"), labels)
        by_id[doc_id] = (
            DocResult(id=doc_id, label=label, confidence=answer_confidence(choice), **tokens)
            if label is not None
            else DocResult(id=doc_id, error=f"answer_not_a_label: {problem}", **tokens)
        )
    missing = "batch_request_missing: the batch returned no line for this document"
    return [by_id.get(str(d["id"])) or DocResult(id=str(d["id"]), error=missing) for d in docs]


def was_returned(*, session: Session, job_id: uuid.UUID, shard_no: int) -> bool:
    """Whether a batch of this shard expired, failed or was refused before: then it runs one
    document at a time (a second batch could miss the deadline too)."""
    return bool(
        session.scalar(
            select(func.count())
            .select_from(SpillBatch)
            .where(
                SpillBatch.job_id == job_id,
                SpillBatch.shard_no == shard_no,
                SpillBatch.state == "returned",
            )
        )
    )


def record_submitting(
    *, session: Session, job_id: uuid.UUID, shard_no: int, attempt: int, expires_at: datetime
) -> None:
    """The row, before anything is sent (a rerun of the same attempt finds it)."""
    session.execute(
        insert(SpillBatch)
        .values(
            job_id=job_id,
            shard_no=shard_no,
            attempt=attempt,
            state="submitting",
            expires_at=expires_at,
        )
        .on_conflict_do_nothing()
    )


def record_submitted(
    *,
    session: Session,
    job_id: uuid.UUID,
    shard_no: int,
    attempt: int,
    remote_batch_id: str,
    input_file_id: str,
    expires_at: datetime,
) -> bool:
    """Record the remote batch and park the shard (lease past the window), fenced on the attempt.

    False when this attempt no longer holds the shard: the caller cancels the remote batch.
    """
    parked = session.execute(
        update(Shard)
        .where(
            Shard.job_id == job_id,
            Shard.shard_no == shard_no,
            Shard.attempt == attempt,
            Shard.state == ShardState.running,
        )
        .values(lease_until=expires_at + PARK_GRACE, route=ROUTE_BATCH)
    ).rowcount  # type: ignore[attr-defined]
    set_state(
        session=session,
        job_id=job_id,
        shard_no=shard_no,
        attempt=attempt,
        state="submitted" if parked else "superseded",
        remote_batch_id=remote_batch_id,
        input_file_id=input_file_id,
    )
    return bool(parked)


def set_state(
    *,
    session: Session,
    job_id: uuid.UUID,
    shard_no: int,
    attempt: int,
    state: str,
    note: str | None = None,
    **values: Any,
) -> None:
    session.execute(
        update(SpillBatch)
        .where(
            SpillBatch.job_id == job_id,
            SpillBatch.shard_no == shard_no,
            SpillBatch.attempt == attempt,
        )
        .values(state=state, note=note, updated_at=func.now(), **values)
    )


def open_batches(*, session: Session) -> list[SpillBatch]:
    """Submitted batches not yet collected or returned, oldest first."""
    return list(
        session.scalars(
            select(SpillBatch)
            .where(SpillBatch.state == "submitted")
            .order_by(SpillBatch.created_at)
        )
    )
