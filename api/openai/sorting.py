"""Sorting a batch's request lines as they are read: the first line whose task can run sets the one
task the batch runs; the lines of that task join its job, every other line becomes an error line.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError
from sqlalchemy.orm import Session

from api.openai.output import ErrorLines
from api.openai.requests import LineError, Request, Task, decode_line, parse_request
from postroom.errors import InvalidInput
from postroom.job_options import JobOptions
from postroom.keys import batch_public_id
from postroom.settings import Settings
from postroom.submit import Submission

# A file of one bad task refuses it once, not once per line; at most this many are remembered.
MAX_REFUSED_TASKS = 100


def options_factory(batch_id: uuid.UUID, window: int) -> Callable[[Task], JobOptions]:
    """The job options of a task: the batch's window is the job's deadline."""

    def options_for(task: Task) -> JobOptions:
        return JobOptions(
            labels=list(task.labels),
            instructions=task.instructions,
            model=task.model,
            deadline=float(window),
            metadata={"batch_id": batch_public_id(batch_id)},
        )

    return options_for


@dataclass
class Sorting:
    """Which task the batch runs and the tallies; accepted lines go to `submission`, the others
    to `errors`. The first candidate task prepares the submission (labels and model checked)."""

    submission: Submission
    errors: ErrorLines
    session: Session
    settings: Settings
    options_for: Callable[[Task], JobOptions]
    requests: int = 0
    accepted: int = 0
    mismatched: int = 0
    reference: Task | None = None
    reference_line: int = 0
    refused: dict[Task, LineError] = field(default_factory=dict)
    seen: dict[str, int] = field(default_factory=dict)

    def add_line(self, raw: bytes | None, line: int) -> None:
        """One non-blank line of the input file (None: a line over the byte limit)."""
        self.requests += 1
        custom_id: str | None = None
        try:
            obj, custom_id = decode_line(raw, line=line, settings=self.settings)
            request = self._sort_request(obj, custom_id, line)
        except LineError as e:
            self.errors.add(custom_id=custom_id, line=line, error=e)
            return
        self.submission.add(
            {"id": custom_id, "text": request.text, "metadata": request.metadata(line)}
        )
        self.accepted += 1

    def failure(self) -> list[dict[str, Any]] | None:
        """The file-level problem that fails the whole batch, if any (its `errors`)."""

        def error(code: str, message: str) -> list[dict[str, Any]]:
            return [{"code": code, "line": None, "message": message}]

        if self.requests == 0:
            return error("empty_file", "the input file has no request lines")
        if self.accepted == 0:
            return error(
                "no_classifiable_lines",
                f"none of the {self.requests} request lines can run as a classification; "
                f"the first {len(self.errors.first)} problems follow",
            )
        if self.mismatched >= self.accepted:
            return error(
                "mixed_label_sets",
                f"the lines use different label sets or instructions: {self.mismatched} differ "
                f"from line {self.reference_line}'s, which only {self.accepted} share; one batch "
                "runs one classification: split the file into one batch per label set",
            )
        return None

    def _sort_request(self, obj: dict[str, Any], custom_id: str, line: int) -> Request:
        first = self.seen.get(custom_id)
        if first is not None:
            raise LineError(
                "duplicate_custom_id",
                f"line {line}: custom_id {custom_id!r} was already used on line {first}; "
                "custom_ids must be unique within a batch",
            )
        self.seen[custom_id] = line
        request = parse_request(obj, line=line, settings=self.settings)
        if self.reference is None:
            refused = self.refused.get(request.task) or self._prepare(request.task)
            if refused is not None:
                raise LineError(refused.code, f"line {line}: {refused.message}")
            self.reference, self.reference_line = request.task, line
        elif request.task != self.reference:
            self.mismatched += 1
            raise LineError(
                "mismatched_classification",
                f"line {line}: its labels, instructions or model differ from the batch's, set by "
                f"line {self.reference_line}; one batch runs one label set and one set of "
                "instructions (put other tasks in their own batch)",
            )
        return request

    def _prepare(self, task: Task) -> LineError | None:
        """Prepare the submission for the first candidate task; the error if it is refused."""
        try:
            self.submission.prepare(self.options_for(task), session=self.session)
        except InvalidInput as e:
            refused = LineError(e.code, e.message)
        except ValidationError as e:
            refused = LineError("invalid_request", str(e))
        else:
            return None
        if len(self.refused) < MAX_REFUSED_TASKS:
            self.refused[task] = refused
        return refused
