"""A stand-in for a managed OpenAI-compatible API: the chat-completions subset spill uses.

A real HTTP server (FastAPI on uvicorn, loopback) for tests, benchmarks and `postroom demo`. It
picks labels deterministically (the first label named in the document, else a hash) and can be
told to misbehave through `POST /admin/faults`: 429 with Retry-After, 500s, malformed bodies,
answers that are garbage or outside the label set, slow responses and hangs, either for the first
calls or for a share of all calls (a steady mix under load). `GET /admin/log` returns what it saw
and which fault each call got, so tests can check how clients behaved (e.g. no retry before
Retry-After).

Oracle mode (`POST /admin/oracle`, `StandinServer.set_oracle`) answers from a truth file (JSONL
with `text` and `label`) instead, wrong on a configurable share of documents (chosen by a hash of
the text, so the same document always gets the same answer): a frontier model of known accuracy,
offline, for `postroom eval --cascade`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect

UNKNOWN_LABEL = "definitely-not-a-label"


@dataclass
class Faults:
    rate_limit_first: int = 0  # the first N calls get 429
    rate_limit_rate: float = 0.0  # share of all calls answered 429 (deterministic, like errors)
    retry_after: float = 1.0
    error_rate: float = 0.0  # share of calls answered 500 (deterministic: every k-th call)
    malformed_body_rate: float = 0.0  # share of calls whose HTTP body is not JSON
    garbage_marker: str = ""  # documents containing it get unparseable content
    outside_marker: str = ""  # documents containing it get a label outside the set
    latency: float = 0.0  # seconds before every answer
    slow_rate: float = 0.0  # share of calls answered only after slow_seconds more
    slow_seconds: float = 0.0
    hang_marker: str = ""  # documents containing it never get an answer
    hang_first: int = 0  # the first N calls never get an answer
    hang_rate: float = 0.0  # share of all calls that never get an answer
    hang_seconds: float = 3600.0
    reject_marker: str = ""  # documents containing it get a 400 (as a too-long prompt would)
    unauthorized: bool = False  # every call gets a 401 (a wrong or revoked API key)


@dataclass
class Oracle:
    """Answers from the truth: `truth` maps a document's text to its label; a share
    `error_rate` of documents get another label; answers carry `confidence`."""

    truth: dict[str, str] = field(default_factory=dict)
    error_rate: float = 0.0
    confidence: float = 0.95

    def answer(self, document: str, labels: list[str]) -> str | None:
        """The oracle's label, or None for a document it has no truth for."""
        label = self.truth.get(document)
        if label is None or label not in labels:
            return None
        digest = int(hashlib.sha256(document.encode()).hexdigest(), 16)
        if len(labels) > 1 and (digest % 10_000) / 10_000 < self.error_rate:
            others = [name for name in labels if name != label]
            return others[(digest // 10_000) % len(others)]
        return label


def load_truth(path: Path) -> dict[str, str]:
    """A labelled JSONL (`{"text": …, "label": …}` per line) as text → label."""
    truth: dict[str, str] = {}
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            if line.strip():
                row = json.loads(line)
                truth[str(row["text"])] = str(row["label"])
    return truth


@dataclass
class Call:
    arrived: float
    status: int = 0
    finished: float = 0.0
    document: str = ""
    disconnected: bool = False
    fault: str = ""  # injected: rate_limit, error, malformed, garbage, outside, slow or hang


@dataclass
class State:
    faults: Faults = field(default_factory=Faults)
    oracle: Oracle | None = None
    calls: list[Call] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def pick_label(document: str, labels: list[str]) -> str:
    text = document.lower()
    for label in labels:
        if label.lower().replace("_", " ") in text:
            return label
    digest = int(hashlib.sha256(document.encode()).hexdigest(), 16)
    return labels[digest % len(labels)]


def _labels_and_key(body: dict[str, Any]) -> tuple[list[str], str | None]:
    """The enum of the response schema (and the property holding it, if the schema is an object)."""
    schema = (body.get("response_format") or {}).get("json_schema", {}).get("schema", {})
    if "enum" in schema:
        return list(schema["enum"]), None
    for name, prop in (schema.get("properties") or {}).items():
        if "enum" in prop:
            return list(prop["enum"]), name
    return [], None


def create_standin(state: State | None = None) -> FastAPI:
    state = state or State()
    app = FastAPI(title="Postroom stand-in managed API")
    app.state.standin = state

    @app.post("/admin/faults")
    async def set_faults(request: Request) -> dict[str, Any]:
        state.faults = Faults(**(await request.json()))
        with state.lock:
            state.calls.clear()
        return asdict(state.faults)

    @app.post("/admin/oracle")
    async def set_oracle(request: Request) -> dict[str, Any]:
        """`{"truth_file": PATH, "error_rate": 0.1, "confidence": 0.95}` turns oracle mode on
        (`{"truth": {text: label}}` instead of a file also works); `{}` turns it off."""
        body = await request.json()
        if not body:
            state.oracle = None
            return {"oracle": False}
        truth = body.get("truth") or load_truth(Path(body["truth_file"]))
        state.oracle = Oracle(
            truth=truth,
            error_rate=float(body.get("error_rate", 0.0)),
            confidence=float(body.get("confidence", 0.95)),
        )
        return {"oracle": True, "documents": len(truth), "error_rate": state.oracle.error_rate}

    @app.get("/admin/log")
    async def log() -> list[dict[str, Any]]:
        with state.lock:
            return [asdict(c) for c in state.calls]

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        call = Call(arrived=time.time())
        with state.lock:
            state.calls.append(call)
            index = len(state.calls)
        try:
            body = await request.json()
        except ClientDisconnect:  # the client died mid-request (the fault suite kills workers)
            call.disconnected = True
            return _done(call, Response(status_code=499))
        call.document = _user_document(body)
        faults = state.faults
        try:
            response = await _injected_fault(call, index, faults)
            if response is None:
                response = _completion(call, index, body, faults, state.oracle)
            return _done(call, response)
        except asyncio.CancelledError:
            call.disconnected = True
            call.finished = time.time()
            raise

    return app


def _user_document(body: dict[str, Any]) -> str:
    """The last user message: the document to classify."""
    messages = body.get("messages") or []
    user = [m for m in messages if m.get("role") == "user"]
    return str(user[-1]["content"]) if user else ""


async def _injected_fault(call: Call, index: int, faults: Faults) -> Response | None:
    """Wait out the latency, slowness or hang this call is due, then answer for the fault it
    gets (a hang, 429, 500 or malformed body); None when the call gets a real answer."""
    if faults.latency:
        await asyncio.sleep(faults.latency)
    if _every(index, faults.slow_rate, offset=4):
        call.fault = "slow"
        await asyncio.sleep(faults.slow_seconds)
    if (
        (faults.hang_marker and faults.hang_marker in call.document)
        or index <= faults.hang_first
        or _every(index, faults.hang_rate, offset=3)
    ):
        call.fault = "hang"
        await asyncio.sleep(faults.hang_seconds)
        # Past any client's deadline: what a gateway would say to a client long gone.
        return JSONResponse({"error": {"message": "timeout"}}, status_code=504)
    if index <= faults.rate_limit_first or _every(index, faults.rate_limit_rate, offset=2):
        call.fault = "rate_limit"
        return JSONResponse(
            {"error": {"message": "rate limited", "type": "rate_limit_exceeded"}},
            status_code=429,
            headers={"Retry-After": f"{faults.retry_after:g}"},
        )
    if faults.unauthorized:
        call.fault = "unauthorized"
        error = {"message": "Incorrect API key provided", "code": "invalid_api_key"}
        return JSONResponse({"error": error}, status_code=401)
    if faults.reject_marker and faults.reject_marker in call.document:
        call.fault = "rejected"
        error = {"message": "This model's maximum context length is exceeded"}
        return JSONResponse({"error": error}, status_code=400)
    if _every(index, faults.error_rate):
        call.fault = "error"
        return JSONResponse({"error": {"message": "boom"}}, status_code=500)
    if _every(index, faults.malformed_body_rate, offset=1):
        call.fault = "malformed"
        return Response(
            '{"id": "chatcmpl-1", "choi', status_code=200, media_type="application/json"
        )
    return None


def _completion(
    call: Call, index: int, body: dict[str, Any], faults: Faults, oracle: Oracle | None = None
) -> Response:
    """A chat completion whose content is the picked label in the requested schema (or, for
    the marked documents, a label outside the set or unparseable content); in oracle mode, the
    oracle's label for the documents it knows."""
    labels, key = _labels_and_key(body)
    if not labels:
        return JSONResponse(
            {"error": {"message": "response_format must carry a JSON schema enum"}},
            status_code=400,
        )
    known = oracle.answer(call.document, labels) if oracle is not None else None
    label = known or pick_label(call.document, labels)
    confidence = oracle.confidence if oracle is not None and known else 0.9
    if faults.outside_marker and faults.outside_marker in call.document:
        call.fault = "outside"
        label = UNKNOWN_LABEL
    content = json.dumps({key: label}) if key else json.dumps(label)
    if faults.garbage_marker and faults.garbage_marker in call.document:
        call.fault = "garbage"
        content = "{" + label
    messages = body.get("messages") or []
    prompt_tokens = sum(len(str(m.get("content", ""))) for m in messages) // 4 + 1
    return JSONResponse(
        {
            "id": f"chatcmpl-{index}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", "standin"),
            "choices": [
                _choice(content, logprobs=bool(body.get("logprobs")), confidence=confidence)
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": 5,
                "total_tokens": prompt_tokens + 5,
            },
        }
    )


def _choice(content: str, *, logprobs: bool, confidence: float = 0.9) -> dict[str, Any]:
    choice: dict[str, Any] = {
        "index": 0,
        "message": {"role": "assistant", "content": content},
        "finish_reason": "stop",
        "logprobs": None,
    }
    if logprobs:
        choice["logprobs"] = {
            "content": [
                {
                    "token": content,
                    "logprob": math.log(confidence),
                    "bytes": None,
                    "top_logprobs": [],
                }
            ]
        }
    return choice


def _every(index: int, rate: float, offset: int = 0) -> bool:
    """Deterministic share: with rate 0.3, calls 1, 4, 7, … (every 1/rate-th, rounded)."""
    if rate <= 0:
        return False
    period = max(1, round(1 / rate))
    return (index + offset) % period == 1 % period


def _done(call: Call, response: Response) -> Response:
    call.status = response.status_code
    call.finished = time.time()
    return response


class StandinServer:
    """Serve the stand-in in a thread (tests, demo). `url` is its OpenAI base URL."""

    def __init__(self, port: int) -> None:
        self.state = State()
        config = uvicorn.Config(
            create_standin(self.state),
            host="127.0.0.1",
            port=port,
            log_level="warning",
            access_log=False,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{port}/v1"

    def start(self) -> StandinServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline:
                raise TimeoutError("stand-in API did not start")
            time.sleep(0.05)
        return self

    def set_faults(self, **faults: Any) -> None:
        self.state.faults = Faults(**faults)
        with self.state.lock:
            self.state.calls.clear()

    def set_oracle(
        self,
        truth: dict[str, str] | Path | None,
        *,
        error_rate: float = 0.0,
        confidence: float = 0.95,
    ) -> None:
        """Answer from `truth` (text → label, or a labelled JSONL); None turns it off."""
        if truth is None:
            self.state.oracle = None
            return
        mapping = load_truth(truth) if isinstance(truth, Path) else dict(truth)
        self.state.oracle = Oracle(truth=mapping, error_rate=error_rate, confidence=confidence)

    def calls(self) -> list[Call]:
        with self.state.lock:
            return list(self.state.calls)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
