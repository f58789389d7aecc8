"""Embedding mode's arithmetic (numpy, no engine): label prototypes and nearest-label scoring.

A label's prototype is its text's vector (its description, or its name phrased by the job's
template) times a weight, plus its few-shot examples' vectors, normalised. A shard's documents
are scored together: with enough of them, their mean vector is subtracted first (centering), so
what every document of the shard shares (a genre, a length, a topic) stops pulling them all to
the same label; then cosine to each prototype, and a softmax over the similarities.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from postroom.domain import DocResult

Matrix = npt.NDArray[np.float32]


def normalise(rows: Matrix) -> Matrix:
    """Each row at unit length (a zero row stays zero)."""
    norms = np.linalg.norm(rows, axis=-1, keepdims=True)
    out: Matrix = np.divide(rows, norms, out=np.zeros_like(rows), where=norms > 0)
    return out


def prototypes(
    label_vectors: Matrix, example_vectors: Sequence[Matrix], *, label_weight: float
) -> Matrix:
    """One unit vector per label: `label_weight` times its text's vector + the sum of its examples'
    vectors (a label without examples keeps its text's direction)."""
    texts = normalise(label_vectors.astype(np.float32))
    rows = []
    for text, examples in zip(texts, example_vectors, strict=True):
        if len(examples):
            rows.append(label_weight * text + normalise(examples).sum(axis=0))
        else:
            rows.append(text)
    return normalise(np.stack(rows))


def nearest_labels(
    names: Sequence[str],
    label_matrix: Matrix,
    doc_vectors: Matrix,
    *,
    ids: Sequence[str],
    tokens_in: Sequence[int],
    truncated: Sequence[bool],
    temperature: float,
    center_min_docs: int,
) -> list[DocResult]:
    """Label each document by highest cosine to the prototypes (after centering the shard when
    it has at least `center_min_docs` documents); confidence is a softmax at `temperature`."""
    docs = doc_vectors.astype(np.float32)
    if center_min_docs and len(docs) >= center_min_docs:
        docs = docs - docs.mean(axis=0, keepdims=True)
    sims = normalise(docs) @ label_matrix.T
    weights = np.exp((sims - sims.max(axis=1, keepdims=True)) / temperature)
    probs = weights / weights.sum(axis=1, keepdims=True)
    best = probs.argmax(axis=1)
    rounded = np.round(probs.astype(np.float64), 6).tolist()
    return [
        DocResult(
            id=doc_id,
            label=names[choice],
            confidence=row[choice],
            distribution=dict(zip(names, row, strict=True)),
            tokens_in=count,
            truncated=cut,
        )
        for doc_id, choice, row, count, cut in zip(
            ids, best.tolist(), rounded, tokens_in, truncated, strict=True
        )
    ]
