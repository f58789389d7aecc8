"""The confidence cascade, part of a shard's work: after the first route has answered, the
documents under the job's `cascade.below` are asked again on the frontier route (the managed API,
or another alias this worker hosts), the least confident first, within the caps.

Caps are decided per shard, so nothing is shared between shards running at once: at most
`max_share` of the shard's documents, and a `max_cost` budget pro rata to the shard's share of
the job's documents (the shards' budgets add up to the job's), counted on the estimated cost of
each escalation before it is made. The escalation runs inside the shard's lease and commits with
its results in the one fenced transaction, so a document still has exactly one result row; a
document whose escalation fails keeps its first answer and records why.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from postroom.costs import ANSWER_TOKENS, TOKENS_PER_CHAR, gpu_cost, spill_cost
from postroom.domain import Cascade, DocResult, FirstAnswer, JobSpec
from postroom.prompts import instructions_text
from postroom.settings import Settings
from worker.classifier import Classifier, ModelNotHosted
from worker.spill import SpillUnavailable

logger = logging.getLogger(__name__)


@dataclass
class CascadeOutcome:
    """What the cascade did to one shard (stored on its row) and the tokens of each route."""

    docs: int = 0  # escalated (asked again)
    failed: int = 0  # escalations that failed: those documents keep their first answer
    agreed: int = 0  # escalations whose answer was the first answer's label
    capped: int = 0  # under the threshold but left out by max_share or max_cost
    tokens_in: int = 0  # the frontier's
    tokens_out: int = 0
    first_tokens_in: int = 0  # the first route's, for the shard's own spend
    first_tokens_out: int = 0

    def outcomes(self) -> dict[str, int]:
        return {
            "escalated": self.docs,
            "failed": self.failed,
            "agreed": self.agreed,
            "capped": self.capped,
        }

    def columns(self) -> dict[str, int]:
        return {
            "cascade_docs": self.docs,
            "cascade_failed": self.failed,
            "cascade_agreed": self.agreed,
            "cascade_capped": self.capped,
            "cascade_tokens_in": self.tokens_in,
            "cascade_tokens_out": self.tokens_out,
        }


def estimated_cost(cascade: Cascade, settings: Settings, *, text: str, prompt_chars: int) -> float:
    """What escalating one document is expected to cost, before it is tokenised."""
    tokens_in = (len(text) + prompt_chars) * TOKENS_PER_CHAR
    if cascade.route == "spill":
        return spill_cost(settings, tokens_in=tokens_in, tokens_out=ANSWER_TOKENS)
    return gpu_cost(settings, tokens_in=tokens_in)


def choose(
    results: Sequence[DocResult],
    docs: Sequence[dict[str, Any]],
    *,
    cascade: Cascade,
    costs: Sequence[float],
    budget: float | None,
) -> tuple[list[int], int]:
    """The indexes to escalate, least confident first, and how many the caps left out.

    A document qualifies when its first answer has a confidence under `below` (an error or an
    unknown confidence does not). Of those, the first `floor(max_share * shard size)` are taken
    while their estimated costs fit the `budget`."""
    under = sorted(
        (
            i
            for i, r in enumerate(results)
            if r.error is None and r.confidence is not None and r.confidence < cascade.below
        ),
        key=lambda i: (results[i].confidence, i),
    )
    limit = math.floor(cascade.max_share * len(docs) + 1e-9)
    chosen: list[int] = []
    spent = 0.0
    for i in under[:limit]:
        if budget is not None and spent + costs[i] > budget:
            break
        spent += costs[i]
        chosen.append(i)
    return chosen, len(under) - len(chosen)


def frontier_spec(spec: JobSpec, cascade: Cascade) -> JobSpec:
    """The job's spec for the frontier alias: same labels and instructions, its model."""
    return spec.model_copy(
        update={
            "model": cascade.model,
            "mode": cascade.mode or spec.mode,
            "revision": cascade.revision,
            "cascade": None,
        }
    )


def escalate(
    *,
    frontier: Classifier | None,
    settings: Settings,
    job_id: uuid.UUID,
    shard: str,
    spec: JobSpec,
    route: str,
    total_docs: int,
    docs: Sequence[dict[str, Any]],
    results: list[DocResult],
) -> tuple[list[DocResult], CascadeOutcome]:
    """Ask the chosen documents again on the frontier; return the final results and counts.

    `frontier` is None when this worker cannot reach the cascade's route (an alias it does not
    host): the chosen documents then keep their first answers with that reason."""
    cascade = spec.cascade
    assert cascade is not None
    outcome = CascadeOutcome(
        first_tokens_in=sum(r.tokens_in for r in results),
        first_tokens_out=sum(r.tokens_out for r in results),
    )
    if route == "spill":
        # A shard on the managed API already has the frontier's answers (or better ones than
        # a self-hosted alias would give): nothing to ask again.
        return results, outcome
    prompt_chars = len(instructions_text(spec.labels, spec.instructions))
    costs = [
        estimated_cost(cascade, settings, text=str(d["text"]), prompt_chars=prompt_chars)
        for d in docs
    ]
    budget = None
    if cascade.max_cost is not None:
        budget = cascade.max_cost * len(docs) / max(total_docs, len(docs))
    chosen, outcome.capped = choose(results, docs, cascade=cascade, costs=costs, budget=budget)
    if not chosen:
        return results, outcome
    outcome.docs = len(chosen)
    answers = _ask(frontier, job_id=job_id, shard=shard, spec=spec, docs=[docs[i] for i in chosen])
    final = list(results)
    for i, answer in zip(chosen, answers, strict=True):
        first = results[i]
        outcome.tokens_in += answer.tokens_in
        outcome.tokens_out += answer.tokens_out
        if answer.error is not None or answer.label is None:
            outcome.failed += 1
            final[i] = first.model_copy(
                update={"escalation_error": answer.error or "no answer from the frontier"}
            )
            continue
        outcome.agreed += answer.label == first.label
        final[i] = answer.model_copy(
            update={
                "first": FirstAnswer(
                    label=first.label,
                    confidence=first.confidence,
                    route=route,
                    model=spec.model,
                ),
                "route": cascade.route,
                "model": cascade.model,
                "revision": cascade.revision,
                "truncated": first.truncated or answer.truncated,
                "tokens_in": first.tokens_in + answer.tokens_in,
                "tokens_out": first.tokens_out + answer.tokens_out,
            }
        )
    logger.info(
        "cascade: escalated=%d failed=%d agreed=%d capped=%d",
        outcome.docs,
        outcome.failed,
        outcome.agreed,
        outcome.capped,
    )
    return final, outcome


def _ask(
    frontier: Classifier | None,
    *,
    job_id: uuid.UUID,
    shard: str,
    spec: JobSpec,
    docs: list[dict[str, Any]],
) -> list[DocResult]:
    """The frontier's answers, one per document; a failure becomes that document's error
    (never the shard's: the first answers stand). EngineDeadError is not caught."""
    cascade = spec.cascade
    assert cascade is not None
    if frontier is None:
        why = f"escalation_failed: this worker does not host {cascade.model!r}"
        return [DocResult(id=str(d["id"]), error=why) for d in docs]
    target = spec if cascade.route == "spill" else frontier_spec(spec, cascade)
    # Its own prepared-prompt cache entry: the engine classifier caches per job id.
    key = job_id if cascade.route == "spill" else uuid.uuid5(job_id, f"cascade:{cascade.model}")
    try:
        answers = frontier.classify(job_id=key, spec=target, shard=shard, docs=docs)
    except (SpillUnavailable, ModelNotHosted, TimeoutError) as e:
        why = f"escalation_failed: {e}"
        return [DocResult(id=str(d["id"]), error=why) for d in docs]
    allowed = {label.name for label in spec.labels}
    return [
        a
        if a.error is not None or a.label in allowed
        else DocResult(id=a.id, error="escalation_failed: the answer was not one of the labels")
        for a in answers
    ]
