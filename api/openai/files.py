"""The files store of the OpenAI API: uploaded batch inputs and batches' output and error files.

A file is a row (its tenant, purpose, name, size) and one S3 object under `files/<id>.jsonl`.
Functions take the session and never commit: the route owns the transaction.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import IO, BinaryIO

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from api.openai.pages import newest_first
from postroom.db.batch_models import File
from postroom.errors import InvalidInput, NotFound, PayloadTooLarge
from postroom.keys import file_key, new_file_id
from postroom.lines import LineSplitter
from postroom.storage import NoSuchObject, S3Object, Storage

PURPOSE_INPUT = "batch"
PURPOSE_OUTPUT = "batch_output"
CONTENT_TYPE = "application/jsonl"
# A candidate for a setting (POSTROOM_BATCH_*): OpenAI's own file limit.
MAX_FILE_BYTES = 200 * 1024 * 1024
CHUNK_BYTES = 1 << 16


def create_file(
    *,
    session: Session,
    storage: Storage,
    tenant_id: uuid.UUID,
    fileobj: BinaryIO,
    filename: str,
    purpose: str,
) -> File:
    """Store an uploaded file (already spooled by the multipart parser) in S3, chunk by chunk."""
    if purpose != PURPOSE_INPUT:
        raise InvalidInput(
            f"purpose {purpose!r} is not supported; upload batch input with purpose=batch",
            details=[{"field": "purpose"}],
        )
    size = fileobj.seek(0, 2)
    if size > MAX_FILE_BYTES:
        raise PayloadTooLarge(
            f"the file is {size:,} bytes; the limit is {MAX_FILE_BYTES:,}: split it into batches",
            details=[{"field": "file"}],
        )
    file_id = new_file_id()
    storage.upload_file(file_key(file_id), fileobj, content_type=CONTENT_TYPE)
    row = File(
        id=file_id,
        tenant_id=tenant_id,
        purpose=purpose,
        filename=filename[:512],
        bytes=size,
        status="processed",
    )
    session.add(row)
    session.flush()
    return row


def store_output_file(
    *,
    session: Session,
    storage: Storage,
    tenant_id: uuid.UUID,
    file_id: str,
    filename: str,
    spool: IO[bytes],
) -> str | None:
    """Store a batch's output or error file from its spool; None when the spool is empty.

    The id is derived from the batch and the row is inserted with ON CONFLICT DO NOTHING, so a
    second finalizer rewrites the same object and row rather than adding new ones.
    """
    size = spool.tell()
    if size == 0:
        return None
    storage.upload_file(file_key(file_id), spool, content_type=CONTENT_TYPE)
    session.execute(
        insert(File)
        .values(
            id=file_id,
            tenant_id=tenant_id,
            purpose=PURPOSE_OUTPUT,
            filename=filename,
            bytes=size,
            status="processed",
        )
        .on_conflict_do_nothing(index_elements=[File.id])
    )
    return file_id


def find_file(*, session: Session, tenant_id: uuid.UUID, file_id: str) -> File:
    row = session.get(File, file_id) if len(file_id) <= 64 else None
    if row is None or row.tenant_id != tenant_id:
        raise NotFound(
            f"no file {file_id!r}; check the id (files of other tenants are not visible)"
        )
    return row


def delete_file(*, session: Session, storage: Storage, tenant_id: uuid.UUID, file_id: str) -> None:
    row = find_file(session=session, tenant_id=tenant_id, file_id=file_id)
    session.delete(row)
    session.flush()
    storage.delete(file_key(file_id))


def list_files(
    *, session: Session, tenant_id: uuid.UUID, purpose: str | None, after: str | None, limit: int
) -> tuple[list[File], bool]:
    """The tenant's files, newest first; `after` is the last id of the previous page."""
    query = select(File).where(File.tenant_id == tenant_id)
    if purpose:
        query = query.where(File.purpose == purpose)
    anchor = find_file(session=session, tenant_id=tenant_id, file_id=after) if after else None
    return newest_first(session=session, query=query, model=File, after=anchor, limit=limit)


def open_file(storage: Storage, file_id: str) -> S3Object:
    """The S3 object of a file, opened before any byte is sent so a missing object is a 404."""
    try:
        return storage.open(file_key(file_id))
    except NoSuchObject as e:
        raise NotFound(f"the content of file {file_id!r} is gone; upload it again") from e


def file_lines(storage: Storage, file_id: str, *, max_bytes: int) -> Iterator[bytes | None]:
    """The file's lines, cut without buffering more than one line (None: a line over the limit)."""
    splitter = LineSplitter(max_bytes)
    with open_file(storage, file_id) as body:
        for chunk in body.chunks(CHUNK_BYTES):
            yield from splitter.feed(chunk)
        yield from splitter.end()
