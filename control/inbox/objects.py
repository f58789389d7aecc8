"""The S3 drop folder's rules, for `postroom beat` and event consumers: which keys are data files,
job.json, and the reasons that say what to fix. No I/O."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime

from pydantic import ValidationError

from postroom.db.inbox_models import InboxObject
from postroom.errors import InvalidInput
from postroom.job_options import JobOptions
from postroom.keys import drop_area, inbox_object_id
from postroom.settings import Settings

JOB_FILE = "job.json"
DATA_SUFFIXES = (".jsonl", ".jsonl.gz")
MAX_JOB_FILE_BYTES = 1024 * 1024
JOB_FILE_FIELDS = (*JobOptions.model_fields, "tenant", "results_format")
# The settings behind the decompressed-size and gzip-ratio limits, named in reasons.


class UnusableObject(Exception):
    """The object can never become a job as it is; `reason` says what to fix (failed/)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class NotReady(Exception):
    """The object cannot become a job yet (no job.json, no worker for its model): retry later."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class DropObject:
    """One object version in `<prefix>/inbox/<folder>/<file>`."""

    bucket: str
    key: str
    etag: str
    size: int
    folder: str
    file: str
    last_modified: datetime | None = None

    @classmethod
    def of_row(cls, row: InboxObject) -> DropObject:
        return cls(row.bucket, row.key, row.etag, row.size, row.folder, row.file)

    @property
    def id(self) -> uuid.UUID:
        return inbox_object_id(self.bucket, self.key, self.etag)

    @property
    def gzip(self) -> bool:
        return self.file.endswith(".gz")


def normalize_etag(etag: str) -> str:
    """Listings quote ETags, event notifications do not: store them bare."""
    return etag.removeprefix("W/").strip('"')


def locate(key: str, *, prefix: str) -> tuple[str, str] | None:
    """(folder, file) of a key in the inbox, or None when the key is not a candidate for a job
    (outside the inbox, a console "folder" marker, or a folder's job.json). A file dropped
    straight into inbox/ has folder ""."""
    inbox = drop_area(prefix, "inbox")
    if not key.startswith(inbox) or key.endswith("/"):
        return None
    folder, _, file = key[len(inbox) :].partition("/")
    if not file:  # no folder: the whole rest is the file name
        folder, file = "", folder
    if file == JOB_FILE:
        return None
    return folder, file


def check_data_file(obj: DropObject, *, prefix: str) -> None:
    """Raise UnusableObject for a file that cannot be a job whatever its content."""
    inbox = drop_area(prefix, "inbox")
    if not obj.folder:
        raise UnusableObject(
            f"{obj.file} was dropped straight into {inbox}; put data files in a folder, "
            f"{inbox}<name>/{obj.file}, next to {inbox}<name>/{JOB_FILE} with the labels"
        )
    if not obj.file.endswith(DATA_SUFFIXES):
        raise UnusableObject(
            f"{obj.file} is not a .jsonl or .jsonl.gz file; only those become jobs. Rename it "
            f"(one JSON document per line) and upload it to {inbox}{obj.folder}/ again"
        )


@dataclass(frozen=True)
class JobFile:
    options: JobOptions
    tenant: str | None
    results_format: str = "jsonl"


def parse_job_file(raw: bytes, *, where: str) -> JobFile:
    """job.json → the job's options and tenant; UnusableObject names every problem."""
    fix = "Fix it, then upload the data files again"
    if len(raw) > MAX_JOB_FILE_BYTES:
        raise UnusableObject(f"{where} is over {MAX_JOB_FILE_BYTES:,} bytes; shorten it. {fix}")
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise UnusableObject(f"{where} is not UTF-8 (byte {e.start}); re-save it. {fix}") from e
    except json.JSONDecodeError as e:
        raise UnusableObject(
            f"{where} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}. {fix}"
        ) from e
    if not isinstance(data, dict):
        raise UnusableObject(
            f'{where} must be a JSON object like {{"labels": ["a", "b"]}}, '
            f"not a {type(data).__name__}. {fix}"
        )
    tenant = data.pop("tenant", None)
    if tenant is not None and (not isinstance(tenant, str) or not 0 < len(tenant.strip()) <= 200):
        raise UnusableObject(f'{where}: "tenant" must be a name of 1 to 200 characters. {fix}')
    results_format = data.pop("results_format", "jsonl")
    if results_format not in ("jsonl", "parquet"):
        raise UnusableObject(f'{where}: "results_format" must be "jsonl" or "parquet". {fix}')
    try:
        options = JobOptions.model_validate(data)
    except ValidationError as e:
        problems = [
            f"{'.'.join(str(p) for p in err['loc']) or 'job.json'}: {err['msg']}"
            for err in e.errors()[:5]
        ]
        raise UnusableObject(
            f"{where} has invalid options: {'; '.join(problems)}. "
            f"Allowed fields: {', '.join(JOB_FILE_FIELDS)}. {fix}"
        ) from e
    return JobFile(
        options=options, tenant=tenant.strip() if tenant else None, results_format=results_format
    )


def invalid_input_reason(error: InvalidInput, *, fix: str) -> str:
    """An API error as a reason file: the message, the first problems, then what to do."""
    lines = [error.message]
    for detail in error.details[:20]:
        where = f"line {detail['line']}" if "line" in detail else detail.get("field", "")
        lines.append(f"  {where}: {detail.get('reason', '')}".rstrip(": "))
    lines.append(fix)
    return "\n".join(lines)


def waits_for_worker(options: JobOptions, settings: Settings) -> bool:
    """True when the job's model is a valid choice that no worker serves yet (so wait for one),
    False when the choice itself is wrong (an unknown alias, a mode the alias does not do)."""
    if options.model is None:
        return True
    spec = settings.models.get(options.model)
    return spec is not None and (options.mode is None or spec.mode == options.mode)
