"""/v1/files (OpenAI-compatible): upload batch input, read, download content, delete."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import APIRouter, Form, Query, UploadFile
from fastapi.responses import StreamingResponse

from api.deps import CallerDep, SessionDep, StorageDep
from api.schemas import ErrorBody
from api.openai.schemas import FileDeleted, FileList, FilePublic
from postroom import batches
from postroom.db.batch_models import File

router = APIRouter(prefix="/v1/files", tags=["openai"])
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (401, 404, 413, 422, 503)
}
CHUNK_BYTES = 1 << 16


def file_public(row: File) -> FilePublic:
    return FilePublic(
        id=row.id,
        bytes=row.bytes,
        created_at=int(row.created_at.timestamp()),
        filename=row.filename,
        purpose=row.purpose,
        status=row.status,
    )


@router.post("", responses=ERRORS)
def create_file(
    file: UploadFile,
    purpose: Annotated[str, Form(description="batch")],
    caller: CallerDep,
    session: SessionDep,
    storage: StorageDep,
) -> FilePublic:
    """Upload a JSONL batch input (multipart `file` + `purpose=batch`), streamed to S3.

    The multipart parser spools the upload to a temporary file (disk past 1 MiB) and S3 receives it
    in parts: the file is never held whole in memory.
    """
    row = batches.create_file(
        session=session,
        storage=storage,
        tenant_id=caller.tenant_id,
        fileobj=file.file,
        filename=file.filename or "upload.jsonl",
        purpose=purpose,
    )
    session.commit()
    return file_public(row)


@router.get("", responses=ERRORS)
def list_files(
    caller: CallerDep,
    session: SessionDep,
    purpose: str | None = None,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> FileList:
    """The tenant's files, newest first; pass the last id as `after` for the next page."""
    rows, has_more = batches.list_files(
        session=session, tenant_id=caller.tenant_id, purpose=purpose, after=after, limit=limit
    )
    data = [file_public(row) for row in rows]
    return FileList(
        data=data,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
        has_more=has_more,
    )


@router.get("/{file_id}", responses=ERRORS)
def get_file(file_id: str, caller: CallerDep, session: SessionDep) -> FilePublic:
    row = batches.find_file(session=session, tenant_id=caller.tenant_id, file_id=file_id)
    return file_public(row)


@router.get(
    "/{file_id}/content",
    responses={**ERRORS, 200: {"content": {"application/jsonl": {}}}},
    response_class=StreamingResponse,
)
def get_file_content(
    file_id: str, caller: CallerDep, session: SessionDep, storage: StorageDep
) -> StreamingResponse:
    """The file's bytes, streamed from S3."""
    row = batches.find_file(session=session, tenant_id=caller.tenant_id, file_id=file_id)
    body = batches.open_file(storage, row.id)

    def chunks() -> Iterator[bytes]:
        try:
            yield from body.iter_chunks(CHUNK_BYTES)
        finally:
            body.close()

    return StreamingResponse(chunks(), media_type="application/jsonl")


@router.delete("/{file_id}", responses=ERRORS)
def delete_file(
    file_id: str, caller: CallerDep, session: SessionDep, storage: StorageDep
) -> FileDeleted:
    batches.delete_file(
        session=session, storage=storage, tenant_id=caller.tenant_id, file_id=file_id
    )
    session.commit()
    return FileDeleted(id=file_id, deleted=True)
