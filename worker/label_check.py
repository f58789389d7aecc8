"""The server-side check of every answer's label against the job's label set."""

from __future__ import annotations

from postroom.domain import DocResult, JobSpec

OFF_LABEL = "the answer was not one of the job's labels; the document was not labelled"


def check_labels(spec: JobSpec, results: list[DocResult]) -> list[DocResult]:
    """The server-side re-check before anything is stored, whatever the engine or the managed
    API answered (documents are data, and decoding is constrained, but this does not trust
    that): a label outside the job's label set becomes a per-document error, never a label."""
    allowed = {label.name for label in spec.labels}
    return [
        r
        if (r.label is None or r.label in allowed)
        and (r.distribution is None or set(r.distribution) <= allowed)
        else r.model_copy(
            update={"label": None, "confidence": None, "distribution": None, "error": OFF_LABEL}
        )
        for r in results
    ]
