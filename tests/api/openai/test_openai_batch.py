"""The OpenAI Batch API through the official `openai` SDK: files, batches, output and error lines,
cancel, expiry, pagination and tenant isolation. A batch runs as a Postroom job on the worker."""

from __future__ import annotations

import json
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

import openai
import pytest
from openai import OpenAI
from openai.types import Batch
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from api.openai.output import answer_content
from api.openai.requests import LineError, Request, parse_request
from control.webhooks import make_http, send_due
from postroom.settings import Settings
from postroom.tenants import create_key, ensure_tenant
from postroom.webhook_signing import verify
from postroom.webhooks import set_tenant_url
from postroom_cli.client import Client
from postroom_cli.local import free_port
from tests.control.test_webhooks import Receiver
from tests.helpers import LABELS, make_docs, wait_for_status
from tests.stack import label_response_format
from tests.waiting import wait_until

pytestmark = pytest.mark.usefixtures("worker")

ENDED = ("completed", "failed", "expired", "cancelled")
SYSTEM = "Classify the customer support ticket by its topic."
SCHEMA = label_response_format("ticket", LABELS)


def sdk(api_url: str, key: str) -> OpenAI:
    return OpenAI(base_url=f"{api_url}/v1", api_key=key, max_retries=0)


def request(custom_id: str | None, text: str, **body: Any) -> dict[str, Any]:
    line: dict[str, Any] = {
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": "tiny",
            "messages": [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": text},
            ],
            "response_format": SCHEMA,
            **body,
        },
    }
    if custom_id is not None:
        line["custom_id"] = custom_id
    return line


def upload(client: OpenAI, lines: list[dict[str, Any] | str]) -> str:
    text = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
    return client.files.create(file=("batch.jsonl", text.encode()), purpose="batch").id


def create(client: OpenAI, lines: list[dict[str, Any] | str], window: str = "24h") -> Batch:
    return client.batches.create(
        input_file_id=upload(client, lines),
        endpoint="/v1/chat/completions",
        completion_window=window,  # type: ignore[arg-type]  # Postroom takes any <n>s|m|h|d
    )


def wait_ended(client: OpenAI, batch_id: str, seen: list[str] | None = None) -> Batch:
    def ended() -> Batch | None:
        batch = client.batches.retrieve(batch_id)
        if seen is not None and (not seen or seen[-1] != batch.status):
            seen.append(batch.status)
        return batch if batch.status in ENDED else None

    return wait_until(ended, timeout=240, what=f"batch {batch_id} ended")


def wait_running(client: OpenAI, batch_id: str) -> Batch:
    """Until the first requests are done: a cancel or expiry after this lands mid-run."""

    def started() -> Batch | None:
        batch = client.batches.retrieve(batch_id)
        assert batch.request_counts is not None
        return batch if batch.request_counts.completed > 0 else None

    return wait_until(started, timeout=180, what=f"first requests of {batch_id} done")


def lines_of(client: OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()]


def test_batch_runs_every_line_once_with_reasons_for_the_bad_ones(
    api_url: str, tenant_key: str
) -> None:
    client = sdk(api_url, tenant_key)
    docs = make_docs(40, prefix="t")
    good = [request(d["id"], d["text"]) for d in docs]
    good.append(request("lp", "my invoice is wrong", logprobs=True, top_logprobs=2))
    extension = request("ext", "the package is late", postroom={"labels": LABELS})
    del extension["body"]["response_format"]
    good.append(extension)
    plain = request("plain", "hello there")
    del plain["body"]["response_format"]
    bad: list[dict[str, Any] | str] = [
        {**request("wrong-url", "x"), "url": "/v1/embeddings"},
        request(None, "no custom id"),
        request(docs[0]["id"], "a duplicate of line 1"),
        plain,
        "{not json",
        request(
            "other-labels",
            "x",
            response_format={
                "type": "json_schema",
                "json_schema": {
                    "name": "t",
                    "schema": {"type": "object", "properties": {"l": {"enum": ["x", "y"]}}},
                },
            },
        ),
        request("no-user", "x", messages=[{"role": "system", "content": SYSTEM}]),
    ]
    batch = create(client, [*good, *bad])
    assert batch.status == "in_progress"
    assert batch.id.startswith("batch_")
    assert batch.model == "tiny"

    # The job ends before anyone reads the batch; then eight readers race to finalize it.
    job_id = str(uuid.UUID(hex=batch.id.removeprefix("batch_")))
    wait_for_status(Client(api_url, tenant_key), job_id)
    with ThreadPoolExecutor(8) as pool:
        reads = list(pool.map(lambda _: client.batches.retrieve(batch.id), range(8)))
    assert {read.status for read in reads} <= {"finalizing", "completed"}
    done = wait_ended(client, batch.id)

    assert done.status == "completed"
    assert done.completed_at is not None
    assert done.output_file_id == f"file-{batch.id.removeprefix('batch_')}-output"
    assert done.error_file_id == f"file-{batch.id.removeprefix('batch_')}-errors"
    output = lines_of(client, done.output_file_id)
    errors = lines_of(client, done.error_file_id)
    assert done.request_counts is not None
    assert done.request_counts.model_dump() == {
        "total": len(good) + len(bad),
        "completed": len(good),
        "failed": len(bad),
    }
    # Every line appears exactly once across output and error (custom_id None: none could be read).
    sent = [line.get("custom_id") if isinstance(line, dict) else None for line in [*good, *bad]]
    assert Counter(line["custom_id"] for line in output + errors) == Counter(sent)
    assert len({line["id"] for line in output + errors}) == len(good) + len(bad)

    by_id = {line["custom_id"]: line for line in output}
    for line in output:
        assert line["error"] is None
        assert line["id"].startswith("batch_req_")
        response = line["response"]
        assert response["status_code"] == 200
        body = response["body"]
        assert body["object"] == "chat.completion"
        assert body["usage"]["prompt_tokens"] > 0
        assert body["usage"]["completion_tokens"] == 1
        content = body["choices"][0]["message"]["content"]
        if line["custom_id"] == "ext":
            assert content in LABELS  # no schema: the label itself
        else:
            assert json.loads(content)["label"] in LABELS
    assert by_id[docs[0]["id"]]["response"]["body"]["choices"][0]["logprobs"] is None
    choice = by_id["lp"]["response"]["body"]["choices"][0]
    logprobs = choice["logprobs"]["content"][0]
    assert logprobs["token"] == json.loads(choice["message"]["content"])["label"]
    assert len(logprobs["top_logprobs"]) == 2
    assert {t["token"] for t in logprobs["top_logprobs"]} <= set(LABELS)
    assert logprobs["logprob"] <= 0

    reasons = {(e["custom_id"], e["error"]["code"]): e["error"]["message"] for e in errors}
    assert all(e["response"] is None for e in errors)
    assert "/v1/embeddings" in reasons[("wrong-url", "invalid_url")]
    assert "no custom_id" in reasons[(None, "missing_custom_id")]
    assert "already used on line 1" in reasons[(docs[0]["id"], "duplicate_custom_id")]
    assert "response_format" in reasons[("plain", "not_a_classification")]
    assert "not valid JSON" in reasons[(None, "invalid_json_line")]
    assert "differ" in reasons[("other-labels", "mismatched_classification")]
    assert "no user message" in reasons[("no-user", "invalid_request")]

    # One output and one error file, whoever finalized: the racing readers saw the same ids.
    outputs = client.files.list(purpose="batch_output")
    assert sorted(f.id for f in outputs) == sorted([done.output_file_id, done.error_file_id])
    assert {read.output_file_id for read in reads} <= {None, done.output_file_id}


def test_cancel_mid_run_keeps_finished_lines(api_url: str, tenant_key: str) -> None:
    client = sdk(api_url, tenant_key)
    docs = make_docs(3000, prefix="c")
    batch = create(client, [request(d["id"], d["text"]) for d in docs])
    statuses: list[str] = [batch.status]

    statuses.append(wait_running(client, batch.id).status)
    cancelling = client.batches.cancel(batch.id)
    statuses.append(cancelling.status)
    done = wait_ended(client, batch.id, statuses)

    sequence = [s for i, s in enumerate(statuses) if i == 0 or statuses[i - 1] != s]
    assert sequence in (
        ["in_progress", "cancelling", "cancelled"],
        ["in_progress", "cancelling", "finalizing", "cancelled"],
    ), statuses
    assert done.status == "cancelled"
    assert done.cancelling_at is not None
    assert done.cancelled_at is not None
    output = lines_of(client, done.output_file_id)
    errors = lines_of(client, done.error_file_id)
    assert 0 < len(output) < len(docs), "cancel must land mid-run"
    assert {e["error"]["code"] for e in errors} == {"batch_cancelled"}
    assert sorted(line["custom_id"] for line in output + errors) == [d["id"] for d in docs]
    assert done.request_counts is not None
    assert done.request_counts.completed == len(output)
    assert done.request_counts.failed == len(errors)
    # A cancelled batch cannot be cancelled into anything else.
    assert client.batches.cancel(batch.id).status == "cancelled"


def test_expired_batch_keeps_partial_results(
    api_url: str, tenant_key: str, sessions: sessionmaker[Session]
) -> None:
    client = sdk(api_url, tenant_key)
    docs = make_docs(3000, prefix="e")
    batch = create(client, [request(d["id"], d["text"]) for d in docs], window="2h")
    assert batch.expires_at is not None
    assert batch.expires_at - batch.created_at == 2 * 3600
    postroom = Client(api_url, tenant_key)
    job_id = str(uuid.UUID(hex=batch.id.removeprefix("batch_")))
    deadline = datetime.fromisoformat(postroom.job(job_id)["deadline"])
    assert abs(deadline.timestamp() - batch.expires_at) < 2  # completion_window is the deadline
    wait_running(client, batch.id)

    # The window passes mid-run. Moving expires_at stands in for waiting two hours.
    with sessions.begin() as session:
        session.execute(
            text("UPDATE batches SET expires_at = now() - interval '1 second' WHERE id = :id"),
            {"id": job_id},
        )
    done = wait_ended(client, batch.id)

    assert done.status == "expired"
    assert done.expired_at is not None
    output = lines_of(client, done.output_file_id)
    errors = lines_of(client, done.error_file_id)
    assert 0 < len(output) < len(docs), "the window must pass mid-run"
    assert {e["error"]["code"] for e in errors} == {"batch_expired"}
    assert sorted(line["custom_id"] for line in output + errors) == [d["id"] for d in docs]
    # The job underneath was cancelled, so no worker spends time on an expired batch.
    assert postroom.job(job_id)["status"] == "cancelled"


def test_file_level_problems_fail_the_batch(api_url: str, tenant_key: str) -> None:
    client = sdk(api_url, tenant_key)
    plain = request("p", "hello")
    del plain["body"]["response_format"]
    other = request(
        "o1",
        "x",
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "t", "schema": {"enum": ["x", "y"]}},
        },
    )
    cases: dict[str, list[dict[str, Any] | str]] = {
        "empty_file": ["", "  "],
        "no_classifiable_lines": [plain, {**request("u", "x"), "url": "/v1/completions"}],
        "mixed_label_sets": [
            request("a", "x"),
            other,
            {**other, "custom_id": "o2"},
        ],
    }
    for code, lines in cases.items():
        batch = create(client, lines)
        assert batch.status == "failed", code
        assert batch.failed_at is not None
        assert batch.output_file_id is None
        assert batch.errors is not None
        assert batch.errors.data is not None
        assert batch.errors.data[0].code == code
        assert batch.errors.data[0].message
    failed = client.batches.retrieve(batch.id)
    assert failed.errors is not None
    assert failed.errors.data is not None
    assert [e.code for e in failed.errors.data] == [
        "mixed_label_sets",
        "mismatched_classification",
        "mismatched_classification",
    ]
    assert [e.line for e in failed.errors.data[1:]] == [2, 3]


def test_files_and_request_validation(api_url: str, tenant_key: str) -> None:
    client = sdk(api_url, tenant_key)
    body = b'{"custom_id": "a"}\n' * 3
    created = client.files.create(file=("in.jsonl", body), purpose="batch")
    assert created.id.startswith("file-")
    assert (created.object, created.bytes, created.filename) == ("file", len(body), "in.jsonl")
    assert client.files.retrieve(created.id).purpose == "batch"
    assert client.files.content(created.id).content == body
    assert [f.id for f in client.files.list()] == [created.id]

    with pytest.raises(openai.UnprocessableEntityError, match="purpose"):
        client.files.create(file=("in.jsonl", body), purpose="fine-tune")
    with pytest.raises(openai.UnprocessableEntityError, match="endpoint"):
        client.batches.create(
            input_file_id=created.id, endpoint="/v1/embeddings", completion_window="24h"
        )
    with pytest.raises(openai.UnprocessableEntityError, match="completion_window"):
        client.batches.create(
            input_file_id=created.id,
            endpoint="/v1/chat/completions",
            completion_window="soon",  # type: ignore[arg-type]
        )

    assert client.files.delete(created.id).deleted is True
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(created.id)
    with pytest.raises(openai.NotFoundError):
        client.batches.create(
            input_file_id=created.id, endpoint="/v1/chat/completions", completion_window="24h"
        )


def test_list_pages_newest_first(api_url: str, tenant_key: str) -> None:
    client = sdk(api_url, tenant_key)
    ids = [create(client, [""], window="24h").id for _ in range(3)]  # failed (empty) batches: cheap
    page = client.batches.list(limit=2)
    assert [b.id for b in page.data] == ids[::-1][:2]
    assert page.has_more is True
    assert [b.id for b in client.batches.list(limit=2)] == ids[::-1]  # auto-paging with `after`
    assert client.batches.list(after=ids[0]).data == []


def test_other_tenant_gets_404(
    api_url: str, tenant_key: str, sessions: sessionmaker[Session]
) -> None:
    owner = sdk(api_url, tenant_key)
    batch = create(owner, [request("a", "my invoice"), request("b", "my login")])
    done = wait_ended(owner, batch.id)
    assert done.output_file_id is not None
    with sessions.begin() as session:
        other_key = create_key(session=session, tenant=f"t-{uuid.uuid4().hex[:12]}")
    other = sdk(api_url, other_key)

    for call in (
        lambda: other.batches.retrieve(batch.id),
        lambda: other.batches.cancel(batch.id),
        lambda: other.files.retrieve(batch.input_file_id),
        lambda: other.files.content(done.output_file_id or ""),
        lambda: other.files.delete(batch.input_file_id),
        lambda: other.batches.create(
            input_file_id=batch.input_file_id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
        ),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    assert other.batches.list().data == []
    assert owner.files.retrieve(batch.input_file_id).id == batch.input_file_id


def test_request_bodies_map_to_labels_and_answers(settings: Settings) -> None:
    def parse(**body: Any) -> Request:
        line = request("x", "my invoice is wrong", **body)
        line["body"] = {k: v for k, v in line["body"].items() if v is not None}
        return parse_request(line, line=7, settings=settings)

    by_property = parse()
    assert by_property.answer == "property:label"
    assert [label.name for label in by_property.task.labels] == LABELS
    assert by_property.task.instructions == SYSTEM
    assert answer_content(by_property.answer, "billing") == '{"label": "billing"}'
    root_enum = {"type": "json_schema", "json_schema": {"schema": {"enum": LABELS}}}
    root = parse(response_format=root_enum)
    assert answer_content(root.answer, "billing") == '"billing"'
    described = parse(
        response_format=None,
        postroom={"labels": [{"name": "billing", "description": "money"}, "technical"]},
    )
    assert described.answer == "text"
    assert described.task.labels[0].description == "money"
    assert parse(model="gpt-4o-mini").task.model == settings.model  # unknown names: the default
    assert parse(logprobs=True, top_logprobs=3).top_logprobs == 3

    refused: dict[str, dict[str, Any]] = {
        "not_a_classification": {"response_format": {"type": "json_schema", "json_schema": {}}},
        "invalid_request": {"logprobs": False, "top_logprobs": 2},
    }
    for code, body in refused.items():
        with pytest.raises(LineError) as error:
            parse(**body)
        assert error.value.code == code
        assert error.value.message.startswith("line 7")
    with pytest.raises(LineError, match="differ"):
        parse(postroom={"labels": ["a", "b"]})


def test_a_batch_that_ends_sends_its_signed_batch_event(
    api_url: str, sessions: sessionmaker[Session], settings: Settings
) -> None:
    # Given a tenant whose default webhook target is a receiver on loopback
    tenant = f"batch-hooks-{uuid.uuid4().hex[:8]}"
    with sessions.begin() as session:
        key = create_key(session=session, tenant=tenant)
    receiver = Receiver(free_port())
    receiver.start()
    with sessions.begin() as session:
        set_tenant_url(
            session=session, tenant_id=ensure_tenant(session=session, name=tenant), url=receiver.url
        )
    secret = Client(api_url, key).webhooks()["secret"]
    client = sdk(api_url, key)
    # When one batch runs to its end, another is cancelled as soon as it is made, and a third
    # one's window passes as soon as it is made (moving expires_at stands in for waiting)
    docs = make_docs(2400, prefix="w")
    ran = create(client, [request(d["id"], d["text"]) for d in docs[:20]])
    cancelled = create(client, [request(d["id"], d["text"]) for d in docs[20:400]])
    client.batches.cancel(cancelled.id)
    expiring = create(client, [request(d["id"], d["text"]) for d in docs[400:]])
    expiring_job = str(uuid.UUID(hex=expiring.id.removeprefix("batch_")))
    with sessions.begin() as session:
        session.execute(
            text("UPDATE batches SET expires_at = now() - interval '1 second' WHERE id = :id"),
            {"id": expiring_job},
        )
    ended = {b.id: wait_ended(client, b.id).status for b in (ran, cancelled, expiring)}
    assert ended == {ran.id: "completed", cancelled.id: "cancelled", expiring.id: "expired"}
    sender = settings.model_copy(update={"webhook_allow_private": True})
    try:
        with make_http(sender) as http:

            def all_sent() -> list[dict[str, Any]] | None:
                send_due(sessions=sessions, settings=sender, http=http)
                events = [json.loads(body) for _, body, _ in receiver.received]
                batch_events = [e for e in events if e["type"].startswith("batch.")]
                expired = [e for e in events if e["data"]["id"] == expiring_job]
                return batch_events if len(batch_events) >= 3 and expired else None

            batch_events = wait_until(all_sent, timeout=60, what="the batch events sent")
    finally:
        receiver.stop()
    # Then each batch's event names how it ended, once, signed with the tenant's secret
    assert sorted((e["data"]["id"], e["type"]) for e in batch_events) == sorted(
        (batch_id, f"batch.{status}") for batch_id, status in ended.items()
    )
    assert all(e["data"]["object"] == "batch" for e in batch_events)
    # and the expired batch's job, cancelled underneath, sent job.expired
    job_events = [json.loads(body) for _, body, _ in receiver.received]
    assert [e["type"] for e in job_events if e["data"]["id"] == expiring_job] == ["job.expired"]
    for headers, body, _ in receiver.received:
        verify(secret, headers, body)
