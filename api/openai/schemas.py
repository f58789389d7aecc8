"""OpenAI-shaped wire models of /v1/files and /v1/batches: what the official `openai` SDK parses.

Times are Unix seconds, as OpenAI's are. Field names and ids (`file-…`, `batch_…`) follow the
OpenAI API reference so the SDK's `files.*` and `batches.*` calls work unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Generic, Literal, Self, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StringConstraints


class Identified(BaseModel):
    """An object with an OpenAI-style id (`file-…`, `batch_…`), as lists page through them."""

    id: str


Item = TypeVar("Item", bound=Identified)


class ListPage(BaseModel, Generic[Item]):
    """One page of a list, newest first: pass `last_id` as `after` for the next page."""

    object: Literal["list"] = "list"
    data: list[Item]
    first_id: str | None
    last_id: str | None
    has_more: bool

    @classmethod
    def of(cls, data: Sequence[Item], *, has_more: bool) -> Self:
        return cls(
            data=list(data),
            first_id=data[0].id if data else None,
            last_id=data[-1].id if data else None,
            has_more=has_more,
        )


class FilePublic(Identified):
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str
    expires_at: int | None = None
    status_details: str | None = None


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool


class FileList(ListPage[FilePublic]):
    pass


MetadataKey = Annotated[str, StringConstraints(max_length=64)]
MetadataValue = Annotated[str, StringConstraints(max_length=512)]


class BatchCreate(BaseModel):
    """`POST /v1/batches`. The input file holds one chat-completions request per line.

    A line is a classification when its `response_format` is a JSON schema with one enum property
    (the enum is the label set) or when its body carries Postroom's extension
    `"postroom": {"labels": ["billing", {"name": "shipping", "description": "…"}]}`.
    """

    model_config = ConfigDict(extra="forbid")

    input_file_id: str = Field(max_length=64, description="a file uploaded with purpose=batch")
    endpoint: str = Field(description="only /v1/chat/completions")
    completion_window: str = Field(
        max_length=16, description="24h (any <n>s, m, h or d up to 30d): the job's deadline"
    )
    metadata: dict[MetadataKey, MetadataValue] | None = Field(default=None, max_length=16)


class BatchError(BaseModel):
    code: str
    message: str
    line: int | None = None
    param: str | None = None


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchError]


class BatchRequestCounts(BaseModel):
    total: int
    completed: int
    failed: int


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class BatchUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails = Field(default_factory=InputTokensDetails)
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int


class BatchPublic(Identified):
    object: Literal["batch"] = "batch"
    endpoint: str
    model: str | None
    errors: BatchErrors | None
    input_file_id: str
    completion_window: str
    status: str
    output_file_id: str | None
    error_file_id: str | None
    created_at: int
    in_progress_at: int | None
    expires_at: int | None
    finalizing_at: int | None
    completed_at: int | None
    failed_at: int | None
    expired_at: int | None
    cancelling_at: int | None
    cancelled_at: int | None
    request_counts: BatchRequestCounts
    usage: BatchUsage | None
    metadata: dict[str, str] | None


class BatchList(ListPage[BatchPublic]):
    pass
