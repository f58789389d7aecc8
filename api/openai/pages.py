"""Keyset pages of the OpenAI lists (files, batches): newest first, `after` the last id of the
previous page, so a page is one index range scan however deep the list goes."""

from __future__ import annotations

from typing import TypeVar

from sqlalchemy import Select, tuple_
from sqlalchemy.orm import Session

from postroom.db.batch_models import Batch, File

Row = TypeVar("Row", File, Batch)


def newest_first(
    *, session: Session, query: Select[Row], model: type[Row], after: Row | None, limit: int
) -> tuple[list[Row], bool]:
    """Up to `limit` rows of `query` older than the anchor row `after`; whether more follow."""
    if after is not None:
        query = query.where(tuple_(model.created_at, model.id) < (after.created_at, after.id))
    order = (model.created_at.desc(), model.id.desc())
    rows = list(session.scalars(query.order_by(*order).limit(limit + 1)))
    return rows[:limit], len(rows) > limit
