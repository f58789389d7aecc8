"""The PostroomError tree: a stable `code` and HTTP status per class."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class PostroomError(Exception):
    """Base of every error Postroom raises on purpose; the API turns it into the one error body."""

    code = "postroom_error"
    http_status = 500

    def __init__(self, message: str, *, details: Sequence[dict[str, Any]] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.details = list(details)


class InvalidInput(PostroomError):
    """The request or a document is malformed; `message` says what to fix."""

    code = "invalid_input"
    http_status = 422


class InvalidDocuments(InvalidInput):
    """Some document lines are bad and `on_invalid=reject`; `details` names each line."""

    code = "invalid_documents"


class InvalidLabels(InvalidInput):
    """The label set breaks a rule (count, empty or duplicate names, length)."""

    code = "invalid_labels"


class UnknownModel(InvalidInput):
    """The job names a model alias that no worker serves."""

    code = "unknown_model"


class InputUriNotAllowed(InvalidInput):
    """`input_uri` names a bucket (or a Postroom-owned key) the deployment does not allow."""

    code = "input_uri_not_allowed"


class PayloadTooLarge(PostroomError):
    """The request body or a single document is over its limit."""

    code = "payload_too_large"
    http_status = 413


class UnsupportedMediaType(PostroomError):
    """The body is in an encoding Postroom does not read (e.g. Content-Encoding: br)."""

    code = "unsupported_media_type"
    http_status = 415


class RequestTimeout(PostroomError):
    """The client sent the request body too slowly (idle between chunks, or past the deadline)."""

    code = "request_timeout"
    http_status = 408


class Unauthorized(PostroomError):
    """No API key, or one that is wrong or revoked."""

    code = "unauthorized"
    http_status = 401


class NotFound(PostroomError):
    """The object does not exist or belongs to another tenant.

    Never 403: that would confirm the object exists.
    """

    code = "not_found"
    http_status = 404


class Conflict(PostroomError):
    """The request conflicts with the current state."""

    code = "conflict"
    http_status = 409


class IdempotencyKeyReused(Conflict):
    """The same Idempotency-Key came with a different body."""

    code = "idempotency_key_reused"


class PriorityNotAllowed(PostroomError):
    """The job asks for a priority above its tenant's maximum (`postroom tenants set`)."""

    code = "priority_not_allowed"
    http_status = 403


class QuotaExceeded(PostroomError):
    """Accepting the job would put its tenant over a quota; `retry_after` says when to try
    again (seconds), sent as the `Retry-After` header of the 429."""

    code = "quota_exceeded"
    http_status = 429

    def __init__(
        self, message: str, *, retry_after: int, details: Sequence[dict[str, Any]] = ()
    ) -> None:
        super().__init__(message, details=details)
        self.retry_after = retry_after


class Unavailable(PostroomError):
    """A dependency (database, broker, S3) cannot be reached; retry later."""

    code = "unavailable"
    http_status = 503


class EngineDeadError(Exception):
    """The inference engine is gone. Fatal: never caught generically; the worker process exits."""
