"""Embedding mode's arithmetic: prototypes from examples, centering, softmax (numpy, no engine)."""

from __future__ import annotations

import numpy as np
import pytest

from worker.embedding import nearest_labels, normalise, prototypes


def _label(docs: np.ndarray, labels: np.ndarray, *, center_min_docs: int) -> list[str | None]:
    results = nearest_labels(
        ["x", "y"],
        labels,
        docs,
        ids=[str(i) for i in range(len(docs))],
        tokens_in=[1] * len(docs),
        truncated=[False] * len(docs),
        temperature=0.05,
        center_min_docs=center_min_docs,
    )
    return [r.label for r in results]


def test_softmax_confidence_and_distribution() -> None:
    labels = np.eye(2, dtype=np.float32)
    [result] = nearest_labels(
        ["x", "y"],
        labels,
        np.array([[0.9, 0.1]], dtype=np.float32),
        ids=["d"],
        tokens_in=[3],
        truncated=[True],
        temperature=0.05,
        center_min_docs=0,
    )
    assert result.label == "x"
    assert result.confidence is not None
    assert result.confidence > 0.99
    assert result.distribution is not None
    assert sum(result.distribution.values()) == pytest.approx(1.0, abs=1e-5)
    assert (result.tokens_in, result.truncated) == (3, True)


def test_examples_pull_a_prototype_towards_them() -> None:
    texts = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=np.float32)
    examples = [np.array([[0.0, 0.0, 1.0]] * 3, dtype=np.float32), np.zeros((0, 3), np.float32)]
    protos = prototypes(texts, examples, label_weight=1.0)
    assert np.allclose(np.linalg.norm(protos, axis=1), 1.0)
    assert protos[0, 2] > protos[0, 0] > 0  # three examples outweigh the name at weight 1
    assert np.allclose(protos[1], [0.0, 1.0, 0.0])  # no examples: the text's direction


def test_centering_takes_out_what_every_document_shares() -> None:
    # Every document leans to "x" through a shared component; only its small part says which.
    shared = np.array([1.0, 0.0, 3.0], dtype=np.float32)
    own = np.array([[0.3, 0.0, 0.0], [0.0, 0.3, 0.0]] * 20, dtype=np.float32)
    docs = shared + own
    labels = normalise(np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=np.float32))
    assert set(_label(docs, labels, center_min_docs=0)) == {"x"}
    assert _label(docs, labels, center_min_docs=32) == ["x", "y"] * 20
    assert set(_label(docs, labels, center_min_docs=41)) == {"x"}  # too few to center
