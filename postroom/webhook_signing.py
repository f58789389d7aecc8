"""Standard Webhooks signatures (standardwebhooks.com): the secret is `whsec_` + base64 of random
bytes; a message is signed as base64(HMAC-SHA256(secret bytes, "{id}.{timestamp}.{body}")) and
sent as `webhook-signature: v1,<signature>` next to `webhook-id` and `webhook-timestamp`."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections.abc import Mapping

SECRET_PREFIX = "whsec_"
TOLERANCE_SECONDS = 5 * 60


class WebhookVerificationError(Exception):
    """A webhook's headers or signature do not check out; the message says which."""


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def _key(secret: str) -> bytes:
    raw = secret.removeprefix(SECRET_PREFIX)
    try:
        return base64.b64decode(raw, validate=True)
    except ValueError as e:
        raise WebhookVerificationError(f"the secret is not whsec_<base64>: {e}") from e


def sign(secret: str, *, msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header value for one attempt."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(_key(secret), signed, hashlib.sha256).digest()
    return f"v1,{base64.b64encode(digest).decode()}"


def signed_headers(
    secret: str, *, msg_id: str, body: bytes, now: float | None = None
) -> dict[str, str]:
    timestamp = int(time.time() if now is None else now)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secret, msg_id=msg_id, timestamp=timestamp, body=body),
        "content-type": "application/json",
    }


def verify(
    secret: str,
    headers: Mapping[str, str],
    body: bytes,
    *,
    now: float | None = None,
    tolerance: float = TOLERANCE_SECONDS,
) -> None:
    """Check a received webhook: headers present, timestamp within `tolerance`, and one of the
    space-separated `v1,` signatures matching (constant-time).

    Raises:
        WebhookVerificationError: saying what failed.
    """
    lower = {k.lower(): v for k, v in headers.items()}
    try:
        msg_id, stamp, signatures = (
            lower[name] for name in ("webhook-id", "webhook-timestamp", "webhook-signature")
        )
    except KeyError as e:
        raise WebhookVerificationError(f"missing header {e.args[0]}") from e
    try:
        timestamp = int(stamp)
    except ValueError as e:
        raise WebhookVerificationError(f"webhook-timestamp {stamp!r} is not a number") from e
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance:
        raise WebhookVerificationError(
            f"webhook-timestamp is {current - timestamp:+.0f} s from now "
            f"(tolerance {tolerance:.0f} s)"
        )
    expected = sign(secret, msg_id=msg_id, timestamp=timestamp, body=body)
    for candidate in signatures.split():
        if candidate.startswith("v1,") and hmac.compare_digest(candidate, expected):
            return
    raise WebhookVerificationError("no signature matches: wrong secret, or the body was changed")
