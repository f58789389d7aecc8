"""The spill worker's side of patient spill (postroom.spill_batches): submit a claimed shard to the
provider's batch endpoint and park it; the beat collects it.

Safe to run twice: the row is keyed by (job, shard, attempt) and written before anything is sent;
a shard parked on a batch is `running` under a long lease, so a duplicate message claims nothing.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import openai

from postroom.spill_batches import (
    ENDPOINT,
    batch_client,
    is_patient,
    record_submitted,
    record_submitting,
    request_lines,
    set_state,
    shard_key,
    was_returned,
    window_seconds,
)
from worker.runtime import Runtime

if TYPE_CHECKING:
    from worker.tasks import ShardRun

logger = logging.getLogger(__name__)


def wants_batch(runtime: Runtime, run: ShardRun) -> bool:
    """A spill shard of a job whose deadline is further than the batch window, never returned."""
    if runtime.route != "spill" or not is_patient(
        runtime.settings, run.order.deadline, datetime.now(UTC)
    ):
        return False
    with runtime.sessions() as session:
        return not was_returned(session=session, job_id=run.job_id, shard_no=run.shard_no)


def submit_batch(runtime: Runtime, run: ShardRun, docs: list[dict[str, Any]]) -> bool:
    """Send the shard as one batch and park it; False when the endpoint refused it (the row says
    why, and the caller classifies the shard now, one document at a time)."""
    settings, fence = runtime.settings, run.fence
    window = settings.spill_batch_completion_window
    expires_at = datetime.now(UTC) + timedelta(seconds=window_seconds(window))
    with runtime.sessions.begin() as session:
        record_submitting(session=session, **fence, expires_at=expires_at)
    key = shard_key(run.job_id, run.shard_no, run.claimed.attempt)
    client = batch_client(settings)
    try:
        upload = client.files.create(
            file=(f"{key.replace('/', '-')}.jsonl", request_lines(settings, run.spec, docs)),
            purpose="batch",
        )
        batch = client.batches.create(
            input_file_id=upload.id,
            endpoint=ENDPOINT,
            completion_window=window,  # type: ignore[arg-type]  # OpenAI: "24h"; others: any
            metadata={"postroom_shard": key},
        )
    except openai.OpenAIError as e:
        with runtime.sessions.begin() as session:
            note = f"submission failed: {type(e).__name__}: {e}"[:500]
            set_state(session=session, **fence, state="returned", note=note)
        logger.warning("batch endpoint refused the shard (%s); classifying it directly", e)
        return False
    if batch.expires_at:
        expires_at = datetime.fromtimestamp(batch.expires_at, UTC)
    # Stop extending the lease before parking, so the park's long lease is the last word.
    runtime.drop(run.job_id, run.shard_no)
    with runtime.sessions.begin() as session:
        parked = record_submitted(
            session=session,
            **fence,
            remote_batch_id=batch.id,
            input_file_id=upload.id,
            expires_at=expires_at,
        )
    if not parked:
        logger.warning("lost the shard while submitting batch %s; cancelling it", batch.id)
        try:
            client.batches.cancel(batch.id)
        except openai.OpenAIError as e:
            logger.warning(
                "could not cancel batch %s (%s); its results will be ignored", batch.id, e
            )
        return True
    logger.info("shard parked on batch %s (%d docs) until %s", batch.id, len(docs), expires_at)
    return True
