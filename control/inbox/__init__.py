"""The S3 drop folder, run by `postroom beat` (and by event consumers for ingest):
`inbox/<name>/<file>` → one job per (bucket, key, ETag) → `outbox/<name>/<file>.results.jsonl`,
input moved to `done/` or `failed/`.

Two ways in, one way through: the beat tick lists the inbox (`run_tick`), and a deployment with S3
event notifications wires its SQS or webhook consumer to `ingest_events(notification)` or
`ingest_event(record)`. Both call `handle_object`, so a lost notification only delays an object
until the next tick, and a notification for an object the tick already took is a no-op.

Exactly once: a row of `inbox_objects` per (bucket, key, ETag), inserted `on conflict do nothing`
(only the inserter proceeds); the job's id is derived from the same triple, and the job is created
in the transaction that moves the row `seen → ingested` fenced on the claim's attempt number. A tick
that dies mid-ingest leaves a `seen` row whose lease runs out; a later tick takes it over and can
at most make that same job.

Modules: `objects` (keys, job.json, reasons), `rows` (`inbox_objects`), `deps`, `ingest`,
`outputs` (S3 moves, outbox, publishing), `tick`, `events`.
"""

from control.inbox.deps import InboxDeps, default_deps
from control.inbox.events import ingest_event, ingest_events, parse_event_record
from control.inbox.ingest import ingest_object
from control.inbox.objects import DropObject, NotReady, UnusableObject
from control.inbox.rows import inbox_report
from control.inbox.tick import InboxCursor, TickReport, handle_object, run_tick

__all__ = [
    "DropObject",
    "InboxCursor",
    "InboxDeps",
    "NotReady",
    "TickReport",
    "UnusableObject",
    "default_deps",
    "handle_object",
    "inbox_report",
    "ingest_event",
    "ingest_events",
    "ingest_object",
    "parse_event_record",
    "run_tick",
]
