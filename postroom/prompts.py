"""Prompt layout and answer parsing for generative and embedding classification (pure, no engine).

Layout is prefix-first: `[instructions + label list] [document] [cue]`, so automatic prefix caching
serves the instructions and labels of every document of a job from cache.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from postroom.domain import DocResult, Label

CUE = "\n\nLabel:"
DOC_HEADER = "\n\nDocument:\n"
MARKER_SETS = (
    [chr(c) for c in range(ord("A"), ord("Z") + 1)],
    [str(n) for n in range(1, 1000)],
)


class Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


class LayoutError(ValueError):
    """The label set cannot be laid out for one-step scoring with this tokenizer."""


@dataclass(frozen=True)
class Layout:
    """A job's prompt pieces as token ids, and the answer token of each label."""

    labels: tuple[str, ...]
    prefix_ids: tuple[int, ...]
    suffix_ids: tuple[int, ...]
    answer_ids: tuple[int, ...]  # answer_ids[i] is the token that means labels[i]
    markers: tuple[str, ...] | None  # option markers when the names' first tokens collide
    doc_budget: int
    shared_first_tokens: tuple[tuple[str, ...], ...] = ()
    # Contextual calibration (a model's `calibrate`): each label's probability for content-free
    # documents; a document's label probabilities are divided by these, then renormalised.
    calibration: tuple[float, ...] = ()

    def prompt(self, doc_ids: Sequence[int]) -> tuple[list[int], bool]:
        """The full prompt for a document's tokens; truncated to the budget (and says so)."""
        truncated = len(doc_ids) > self.doc_budget
        body = list(doc_ids[: self.doc_budget])
        return [*self.prefix_ids, *body, *self.suffix_ids], truncated


def answer_token(tokenizer: Tokenizer, answer: str) -> int:
    """The first token of `answer` as it would follow the cue (context-aware where it matters)."""
    cue = tokenizer.encode(CUE, add_special_tokens=False)
    both = tokenizer.encode(CUE + " " + answer, add_special_tokens=False)
    if both[: len(cue)] == cue and len(both) > len(cue):
        return both[len(cue)]
    return tokenizer.encode(" " + answer, add_special_tokens=False)[0]


def first_token_collisions(tokenizer: Tokenizer, names: Sequence[str]) -> list[tuple[str, ...]]:
    """Groups of label names that start with the same token (they weaken one-step scoring)."""
    groups: dict[int, list[str]] = {}
    for name in names:
        groups.setdefault(answer_token(tokenizer, name), []).append(name)
    return [tuple(group) for group in groups.values() if len(group) > 1]


def instructions_text(
    labels: Sequence[Label], instructions: str, markers: Sequence[str] | None = None
) -> str:
    """The shared part of every prompt of a job: instructions, then the labels. The GPU route puts
    the document after it; the spill route sends it as the system message."""
    lines = []
    for index, label in enumerate(labels):
        head = f"{markers[index]}) {label.name}" if markers else f"- {label.name}"
        lines.append(f"{head}: {label.description}" if label.description else head)
    answer_hint = "the letter or number of the label" if markers else "the label"
    text = f"{instructions.strip()}\n\nLabels:\n" + "\n".join(lines)
    examples = [
        f"Text: {json.dumps(example, ensure_ascii=False)}\nLabel: "
        + (markers[index] if markers else label.name)
        for index, label in enumerate(labels)
        for example in label.examples or ()
    ]
    if examples:
        text += "\n\nExamples:\n" + "\n\n".join(examples)
    return text + f"\n\nAnswer with {answer_hint} only."


def build_layout(
    tokenizer: Tokenizer,
    *,
    labels: Sequence[Label],
    instructions: str,
    doc_max_tokens: int,
    max_model_len: int,
) -> Layout:
    names = [label.name for label in labels]
    collisions = first_token_collisions(tokenizer, names)
    markers: list[str] | None = None
    answers = [answer_token(tokenizer, name) for name in names]
    if collisions:
        for candidates in MARKER_SETS:
            if len(candidates) < len(names):
                continue
            marker_ids = [answer_token(tokenizer, m) for m in candidates[: len(names)]]
            if len(set(marker_ids)) == len(names):
                markers, answers = candidates[: len(names)], marker_ids
                break
        else:
            raise LayoutError(
                "the labels' first tokens collide and no set of option markers is distinct under "
                "this tokenizer; use decoding='choice'"
            )
    prefix = instructions_text(labels, instructions, markers) + DOC_HEADER
    prefix_ids = tokenizer.encode(prefix, add_special_tokens=True)
    suffix_ids = tokenizer.encode(CUE, add_special_tokens=False)
    budget = min(doc_max_tokens, max_model_len - len(prefix_ids) - len(suffix_ids) - 1)
    if budget < 1:
        raise LayoutError(
            f"instructions and labels take {len(prefix_ids)} tokens, leaving no room for the "
            f"document in the model's {max_model_len}-token context; shorten them"
        )
    return Layout(
        labels=tuple(names),
        prefix_ids=tuple(prefix_ids),
        suffix_ids=tuple(suffix_ids),
        answer_ids=tuple(answers),
        markers=tuple(markers) if markers else None,
        doc_budget=budget,
        shared_first_tokens=tuple(collisions),
    )


# Content-free documents for contextual calibration (Zhao et al. 2021, "Calibrate Before Use"):
# what the model answers with no evidence is its bias towards each label.
CONTENT_FREE = ("N/A", "", "[MASK]")
CALIBRATION_FLOOR = 1e-4


def calibration(layout: Layout, content_free: Sequence[dict[int, float]]) -> tuple[float, ...]:
    """Each label's mean probability over the content-free documents' answer-token logprobs
    (normalised over the labels, floored so that no label is divided by ~0)."""
    sums = [0.0] * len(layout.answer_ids)
    for logprobs in content_free:
        probs = [math.exp(logprobs[t]) if t in logprobs else 0.0 for t in layout.answer_ids]
        total = sum(probs)
        if total and math.isfinite(total):
            sums = [s + p / total for s, p in zip(sums, probs, strict=True)]
    total = sum(sums)
    if not total:
        return ()
    return tuple(max(s / total, CALIBRATION_FLOOR) for s in sums)


def parse_scores(
    layout: Layout, logprobs: dict[int, float], *, doc_id: str, tokens_in: int, truncated: bool
) -> DocResult:
    """Label and distribution from the answer tokens' logprobs of one forward pass."""
    probs = [math.exp(logprobs[t]) if t in logprobs else 0.0 for t in layout.answer_ids]
    total = sum(probs)
    if not total or not math.isfinite(total):
        return DocResult(
            id=doc_id,
            error="no_label_scores: the engine returned no probability for any label",
            tokens_in=tokens_in,
            truncated=truncated,
        )
    if layout.calibration:
        probs = [p / c for p, c in zip(probs, layout.calibration, strict=True)]
        total = sum(probs)
    probs = [p / total for p in probs]
    best = max(range(len(probs)), key=probs.__getitem__)
    return DocResult(
        id=doc_id,
        label=layout.labels[best],
        confidence=round(probs[best], 6),
        distribution={name: round(p, 6) for name, p in zip(layout.labels, probs, strict=True)},
        tokens_in=tokens_in,
        tokens_out=1,
        truncated=truncated,
    )


def parse_choice(
    labels: Sequence[str],
    *,
    doc_id: str,
    text: str,
    finish_reason: str | None,
    logprob_sum: float | None,
    tokens_in: int,
    tokens_out: int,
    truncated: bool,
) -> DocResult:
    """A constrained-choice answer; a cut-off or out-of-set answer is an error, never a label."""
    answer = text.strip()
    if finish_reason != "stop":
        return DocResult(
            id=doc_id,
            error=f"answer_cut_off: stopped ({finish_reason}) after {tokens_out} tokens "
            f"at {answer[:40]!r}",
            tokens_in=tokens_in,
            tokens_out=tokens_out,
            truncated=truncated,
        )
    if answer not in labels:
        return DocResult(
            id=doc_id,
            error=f"answer_not_a_label: {answer[:40]!r}",
            tokens_in=tokens_in,
            tokens_out=tokens_out,
            truncated=truncated,
        )
    confidence = round(math.exp(logprob_sum), 6) if logprob_sum is not None else None
    return DocResult(
        id=doc_id,
        label=answer,
        confidence=confidence,
        tokens_in=tokens_in,
        tokens_out=tokens_out,
        truncated=truncated,
    )


def label_texts(labels: Sequence[Label], template: str | None = None) -> list[str]:
    """What embedding mode embeds for each label: its description, else its name phrased by
    `template` (`{name}`; the bare name when None)."""
    return [
        label.description or (template.format(name=label.name) if template else label.name)
        for label in labels
    ]
