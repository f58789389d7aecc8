"""The spill route's classifier: any OpenAI-compatible chat-completions endpoint.

Same prompt as generative mode (instructions and labels as the system message, the document as the
user message); the answer is forced to the label set with a JSON-schema enum and validated. An
answer outside the set (or unparseable) is asked again once, then that document fails with the
reason. Rate limits and faults: bounded concurrency, `Retry-After` honoured for every request of
the process (it is the endpoint's rate limit, not one request's), exponential backoff with jitter on
5xx and timeouts, a total deadline per call, and a circuit breaker. When a document cannot get an
answer the whole shard goes back to the queue (SpillUnavailable): nothing is lost, and the claim
and upsert path makes the rerun harmless.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import openai
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_random_exponential,
)

from postroom.domain import DocResult, JobSpec
from postroom.prompts import instructions_text
from postroom.settings import Settings
from postroom.spill_answers import answer_confidence, parse_answer, response_schema
from worker.loop import LoopThread

logger = logging.getLogger(__name__)


class SpillUnavailable(Exception):
    """The endpoint cannot answer now (breaker open, retries spent): the shard goes back."""


class SpillConfigError(Exception):
    """This process can never call the managed API (no URL, or its client cannot be built): a
    spill worker refuses to start rather than heartbeat while failing every shard."""


def new_client(settings: Settings) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=settings.spill_base_url,
        api_key=settings.spill_api_key.get_secret_value() or "none",
        max_retries=0,  # ours below: Retry-After for the whole process, breaker, deadline
        timeout=settings.spill_call_deadline_seconds,
    )


def check_client(settings: Settings) -> None:
    """Build (and close) the client a spill worker will use, before the worker starts.

    What fails here fails every call later: a missing or malformed POSTROOM_SPILL_BASE_URL, or a
    missing library (httpx builds its transport, and imports httpcore, only now; the SDK imports
    its chat-completions path, and jiter with it, only on first use). An
    endpoint that is down is not checked: that is transient, and the breaker handles it.
    """
    if not settings.spill_base_url:
        raise SpillConfigError(
            "POSTROOM_SPILL_BASE_URL is not set: a spill worker needs the managed API's "
            "OpenAI-compatible base URL (for example https://api.openai.com/v1)"
        )
    try:
        url = urlsplit(settings.spill_base_url)
        usable = url.scheme in ("http", "https") and bool(url.hostname)
    except ValueError:  # "http://[::1": an unclosed IPv6 bracket
        usable = False
    if not usable:
        raise SpillConfigError(
            f"POSTROOM_SPILL_BASE_URL={settings.spill_base_url!r} is not an http(s) URL "
            "(for example https://api.openai.com/v1)"
        )

    async def build() -> None:
        client = new_client(settings)
        try:
            _ = client.chat.completions  # imported on first use: now, not mid-job
        finally:
            await client.close()

    try:
        asyncio.run(build())
    except Exception as e:
        raise SpillConfigError(
            f"cannot build the managed API client for POSTROOM_SPILL_BASE_URL="
            f"{settings.spill_base_url!r}: {type(e).__name__}: {e}"
        ) from e


class _Rejected(Exception):
    """The endpoint answered this one request with a 4xx of its own (a prompt too long, say):
    that document fails with the reason; the route is fine."""


class _Transient(Exception):
    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class CircuitBreaker:
    """Open after `failures` consecutive failures; let one call through after `reset` seconds."""

    def __init__(self, failures: int, reset: float) -> None:
        self.failures = failures
        self.reset = reset
        self.consecutive = 0
        self.opened_at: float | None = None

    def check(self) -> None:
        if self.opened_at is None:
            return
        if time.monotonic() - self.opened_at < self.reset:
            raise SpillUnavailable("circuit breaker open: the managed API keeps failing")
        self.opened_at = None  # half-open: this call decides
        self.consecutive = self.failures - 1

    @property
    def is_open(self) -> bool:
        """Open and not yet due for its trial call (what the heartbeat reports to the router)."""
        return self.opened_at is not None and time.monotonic() - self.opened_at < self.reset

    def success(self) -> None:
        self.consecutive = 0
        self.opened_at = None

    def failure(self) -> None:
        self.consecutive += 1
        if self.consecutive >= self.failures and self.opened_at is None:
            self.opened_at = time.monotonic()
            logger.warning("circuit breaker opened after %d failures", self.consecutive)


class Ewma:
    """An exponentially weighted moving average (None until the first value)."""

    def __init__(self, alpha: float) -> None:
        self.alpha = alpha
        self.value: float | None = None

    def add(self, x: float) -> None:
        self.value = x if self.value is None else self.value + self.alpha * (x - self.value)


class SpillClassifier:
    route = "spill"

    def __init__(
        self,
        *,
        loop: LoopThread,
        settings: Settings,
        settle: bool = False,
        shards_at_once: int | None = None,
    ) -> None:
        """`settle`: a document the endpoint cannot answer becomes that document's error
        instead of sending the whole shard back (the cascade, whose documents have an answer
        already). `shards_at_once`: the worker's Celery concurrency, which with the shards'
        size bounds how many slots can ever be busy."""
        self.loop = loop
        self.settings = settings
        self.settle = settle
        self.model = settings.spill_model or "default"
        self.breaker = CircuitBreaker(
            settings.spill_breaker_failures, settings.spill_breaker_reset_seconds
        )
        self._not_before = 0.0  # monotonic time before which no request may go out (Retry-After)
        self._client: openai.AsyncOpenAI | None = None
        self._sem: asyncio.Semaphore | None = None
        self._slot_seconds = Ewma(alpha=0.05)  # how long a call holds one of the slots
        self._shard_docs = Ewma(alpha=0.2)  # documents per shard classified
        self.shards_at_once = shards_at_once
        self.calls = 0

    def _ensure(self) -> tuple[openai.AsyncOpenAI, asyncio.Semaphore]:
        # Built on the loop thread, where they are used.
        if self._client is None or self._sem is None:
            self._client = new_client(self.settings)
            self._sem = asyncio.Semaphore(self.settings.spill_concurrency)
        return self._client, self._sem

    def health(self) -> dict[str, Any]:
        """For the heartbeat: the router sends no deadline work to a route whose breakers are all
        open, and takes its unclaimed shards back to live GPUs. `capacity_docs_per_s` is what
        this process finishes when its slots are full (Little's law: slots over the seconds a
        call holds one, Retry-After waits included); the router plans with it, since spill's
        measured drain rate is only what it was sent. Slots no shard can fill do not count:
        8 shards of 2 documents keep at most 16 calls in flight, whatever spill_concurrency."""
        held = self._slot_seconds.value
        slots = float(self.settings.spill_concurrency)
        if self.shards_at_once and self._shard_docs.value:
            slots = min(slots, self.shards_at_once * self._shard_docs.value)
        capacity = slots / held if held else None
        return {
            "breaker_open": self.breaker.is_open,
            "calls": self.calls,
            "capacity_docs_per_s": round(capacity, 1) if capacity else None,
        }

    def classify(
        self, *, job_id: uuid.UUID, spec: JobSpec, shard: str, docs: Sequence[dict[str, Any]]
    ) -> list[DocResult]:
        if not self.settings.spill_base_url:
            raise SpillUnavailable("POSTROOM_SPILL_BASE_URL is not set")
        self._shard_docs.add(len(docs))
        system = instructions_text(spec.labels, spec.instructions)
        labels = [label.name for label in spec.labels]
        # Every call has its own deadline; this bound only keeps a stuck loop from holding the
        # Celery thread forever.
        s = self.settings
        waves = math.ceil(len(docs) / s.spill_concurrency) or 1
        per_doc = (
            2 * s.spill_max_tries * (s.spill_call_deadline_seconds + s.spill_backoff_max_seconds)
        )
        timeout = waves * per_doc
        return self.loop.run(self._classify_all(system, labels, docs), timeout=timeout)

    async def _classify_all(
        self, system: str, labels: list[str], docs: Sequence[dict[str, Any]]
    ) -> list[DocResult]:
        tasks = [asyncio.ensure_future(self._one(system, labels, doc)) for doc in docs]
        if self.settle:
            done = await asyncio.gather(*tasks, return_exceptions=True)
            return [_settled(doc, outcome) for doc, outcome in zip(docs, done, strict=True)]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    async def _one(self, system: str, labels: list[str], doc: dict[str, Any]) -> DocResult:
        doc_id = str(doc["id"])
        tokens_in = tokens_out = 0
        why = ""
        for _ in range(2):  # an answer outside the label set is asked again once
            try:
                response = await self._call(system, labels, str(doc["text"]))
            except _Rejected as e:
                return DocResult(id=doc_id, error=f"rejected_by_managed_api: {e}")
            if response.usage:
                tokens_in += response.usage.prompt_tokens
                tokens_out += response.usage.completion_tokens
            choice = response.choices[0]
            label, problem = parse_answer(choice.message.content, labels)
            if label is not None:
                return DocResult(
                    id=doc_id,
                    label=label,
                    confidence=answer_confidence(choice),
                    tokens_in=tokens_in,
                    tokens_out=tokens_out,
                )
            why = problem or ""
        return DocResult(
            id=doc_id,
            error=f"answer_not_a_label: {why} (asked twice)",
            tokens_in=tokens_in,
            tokens_out=tokens_out,
        )

    async def _call(self, system: str, labels: list[str], text: str) -> Any:
        client, sem = self._ensure()
        s = self.settings
        backoff = wait_random_exponential(multiplier=0.5, max=s.spill_backoff_max_seconds)

        def wait(state: RetryCallState) -> float:
            error = state.outcome.exception() if state.outcome else None
            after = getattr(error, "retry_after", None)
            return float(after) if after else float(backoff(state))

        retrying = AsyncRetrying(
            stop=stop_after_attempt(s.spill_max_tries),
            wait=wait,
            retry=retry_if_exception_type(_Transient),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    self.breaker.check()
                    async with sem:
                        started = time.monotonic()
                        try:
                            # After taking a slot, so requests queued for one also wait out a
                            # Retry-After that arrived while they queued.
                            await self._respect_retry_after()
                            return await self._request(client, system, labels, text)
                        finally:
                            self._slot_seconds.add(time.monotonic() - started)
        except _Transient as e:
            raise SpillUnavailable(
                f"managed API unavailable after {s.spill_max_tries} tries: {e}"
            ) from e
        raise AssertionError("unreachable")  # pragma: no cover

    async def _respect_retry_after(self) -> None:
        delay = self._not_before - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
            await self._respect_retry_after()  # a later 429 may have moved the gate further

    async def _request(
        self, client: openai.AsyncOpenAI, system: str, labels: list[str], text: str
    ) -> Any:
        self.calls += 1
        try:
            async with asyncio.timeout(self.settings.spill_call_deadline_seconds):
                response = await client.chat.completions.create(
                    model=self.model,
                    messages=[
                        {"role": "system", "content": system},
                        {"role": "user", "content": text},
                    ],
                    response_format=response_schema(labels),  # type: ignore[call-overload]
                    logprobs=True,
                    temperature=0,
                    max_tokens=self.settings.spill_max_tokens,
                )
        except openai.RateLimitError as e:
            after = _retry_after(e.response.headers.get("retry-after"))
            if after:
                self._not_before = max(self._not_before, time.monotonic() + after)
            raise _Transient("429 rate limited", retry_after=after) from e
        except (openai.InternalServerError, openai.APIConnectionError, TimeoutError) as e:
            self.breaker.failure()
            raise _Transient(f"{type(e).__name__}: {e}") from e
        except (openai.APIResponseValidationError, ValueError) as e:  # a body that is not JSON
            self.breaker.failure()
            raise _Transient(f"malformed response: {e}") from e
        except (
            openai.AuthenticationError,
            openai.PermissionDeniedError,
            openai.NotFoundError,
        ) as e:
            # Every call would get the same: the key or the model is wrong. Not retried; the
            # shard goes back, and the breaker opens, so the router stops sending work here.
            self.breaker.failure()
            raise SpillUnavailable(
                f"the managed API refused the call ({e.status_code}: {_message(e)}): check "
                "POSTROOM_SPILL_API_KEY, POSTROOM_SPILL_MODEL and POSTROOM_SPILL_BASE_URL"
            ) from e
        except openai.APIStatusError as e:  # another 4xx: about this request only
            self.breaker.success()
            raise _Rejected(f"{e.status_code}: {_message(e)}") from e
        if not response.choices:
            self.breaker.failure()
            raise _Transient("response without choices")
        self.breaker.success()
        return response


def _settled(doc: dict[str, Any], outcome: DocResult | BaseException) -> DocResult:
    if isinstance(outcome, SpillUnavailable):
        return DocResult(id=str(doc["id"]), error=f"escalation_failed: {outcome}")
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def _message(error: openai.APIStatusError) -> str:
    """The endpoint's own words ({"error": {"message": …}}), else the status line."""
    body = error.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])[:300]
    return str(error.message)[:300]


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None
