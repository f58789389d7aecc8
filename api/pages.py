"""Opaque keyset-pagination cursors for lists ordered by (created_at, id), newest first."""

from __future__ import annotations

import base64
import binascii
import uuid
from datetime import datetime

from postroom.errors import InvalidInput


def encode_cursor(created_at: datetime, row_id: uuid.UUID) -> str:
    """An opaque page cursor: the (created_at, id) of the last row of the page."""
    raw = f"{created_at.isoformat()}|{row_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        created, _, row_id = raw.partition("|")
        when = datetime.fromisoformat(created)
        if when.tzinfo is None:
            raise ValueError("cursor time without a timezone")
        return when, uuid.UUID(row_id)
    except (ValueError, binascii.Error, UnicodeDecodeError) as e:
        raise InvalidInput(
            "cursor is not valid; pass the `next_cursor` of the previous page unchanged",
            details=[{"field": "cursor"}],
        ) from e
