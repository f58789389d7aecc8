"""Prometheus metrics: the counters workers and beat update, the gauges a worker reads from its
engines at scrape time. The gauges the API computes from Postgres are in postroom.postgres_metrics.

Names follow Prometheus conventions: `postroom_` prefix, base units in the name, `_total` on
counters. Rates, ratios and hit rates are derived in PromQL (see config/grafana/dashboards/).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from prometheus_client import REGISTRY, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from postroom.costs import batch_cost, gpu_cost, spill_cost
from postroom.domain import DocResult
from postroom.settings import Settings

logger = logging.getLogger(__name__)

# -- beat: router and reaper
ROUTER_DECISIONS = Counter(
    "postroom_router_decisions_total",
    "Router decisions, by decision and reason",
    ["decision", "reason"],
)
SPILLED_SHARDS = Counter("postroom_router_spilled_shards_total", "Shards the router sent to spill")
REAPER_ACTIONS = Counter(
    "postroom_reaper_actions_total",
    "Reaper actions: expired (leases run out), republished (lost messages), rewritten (result "
    "objects rebuilt from Postgres), trimmed (excess doorbells dropped), withdrawn (jobs whose "
    "upload died mid-way)",
    ["action"],
)

# -- workers: counted when a shard's results are committed
DOCUMENTS = Counter(
    "postroom_documents_total",
    "Documents with committed results, by route, model alias and outcome (succeeded, failed)",
    ["route", "model", "outcome"],
)
TOKENS = Counter(
    "postroom_tokens_total",
    "Tokens of committed results, by route, model alias and direction (in: prompt, out: answer)",
    ["route", "model", "direction"],
)
DOCUMENT_FAILURES = Counter(
    "postroom_document_failures_total",
    "Failed documents, by reason code (the text before ':' of the result's error)",
    ["reason"],
)
CASCADE = Counter(
    "postroom_cascade_documents_total",
    "Cascade: documents escalated to the frontier route, those whose escalation failed, those "
    "where both routes agreed, and those under the threshold the caps left out",
    ["outcome"],
)
SPEND = Counter(
    "postroom_spend_dollars_total",
    "Estimated spend of committed results in dollars, by route (POSTROOM_SPILL_PRICE_*, "
    "POSTROOM_GPU_PRICE_PER_HOUR over POSTROOM_GPU_TOKENS_PER_SECOND)",
    ["route"],
)
SHARD_SECONDS = Histogram(
    "postroom_shard_seconds",
    "Seconds from claim to committed results, per shard",
    ["route", "model"],
    buckets=(0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800),
)
SHARDS = Counter(
    "postroom_shards_total",
    "Shards a worker stopped working, by route and outcome (committed, lease_lost, split, "
    "released: given back after a transient error, failed_attempt: raised, cancelled: its job "
    "was cancelled as it was claimed)",
    ["route", "outcome"],
)

# -- API
HTTP_REQUESTS = Counter(
    "postroom_http_requests_total",
    "API requests, by method, route template and status code",
    ["method", "route", "status"],
)
HTTP_SECONDS = Histogram(
    "postroom_http_request_seconds",
    "API request duration until the response starts, by method and route template",
    ["method", "route"],
)

_REASON = re.compile(r"[a-z][a-z0-9_]{0,39}")


def failure_reason(error: str) -> str:
    """The reason code of a result's error: the text before ':' (bounded: else `other`)."""
    code = error.split(":", 1)[0].strip()
    return code if _REASON.fullmatch(code) else "other"


def observe_shard(
    *,
    settings: Settings,
    route: str,
    model: str,
    results: Sequence[DocResult],
    seconds: float,
    frontier: tuple[str, str, int, int] | None = None,
    cascade: Mapping[str, int] | None = None,
) -> None:
    """Count one committed shard: documents, tokens, failures by reason, spend, latency.

    With a cascade, `frontier` is its (route, model, tokens in, tokens out), counted on that
    route (the results' tokens hold both routes'), and `cascade` its counts by outcome."""
    failed = [r for r in results if r.error]
    tokens_in = sum(r.tokens_in for r in results)
    tokens_out = sum(r.tokens_out for r in results)
    if frontier is not None:
        f_route, f_model, f_in, f_out = frontier
        tokens_in, tokens_out = tokens_in - f_in, tokens_out - f_out
        TOKENS.labels(f_route, f_model, "in").inc(f_in)
        TOKENS.labels(f_route, f_model, "out").inc(f_out)
        f_cost = (
            spill_cost(settings, tokens_in=f_in, tokens_out=f_out)
            if f_route == "spill"
            else gpu_cost(settings, tokens_in=f_in)
        )
        SPEND.labels(f_route).inc(f_cost)
    for outcome, count in (cascade or {}).items():
        CASCADE.labels(outcome).inc(count)
    DOCUMENTS.labels(route, model, "succeeded").inc(len(results) - len(failed))
    DOCUMENTS.labels(route, model, "failed").inc(len(failed))
    for result in failed:
        DOCUMENT_FAILURES.labels(failure_reason(result.error or "")).inc()
    TOKENS.labels(route, model, "in").inc(tokens_in)
    TOKENS.labels(route, model, "out").inc(tokens_out)
    if route == "spill":
        cost = spill_cost(settings, tokens_in=tokens_in, tokens_out=tokens_out)
    elif route == "batch":
        cost = batch_cost(settings, tokens_in=tokens_in, tokens_out=tokens_out)
    else:
        cost = gpu_cost(settings, tokens_in=tokens_in)
    SPEND.labels(route).inc(cost)
    SHARD_SECONDS.labels(route, model).observe(seconds)
    SHARDS.labels(route, "committed").inc()


def serve_metrics(*, port: int, bind: str, collectors: Iterable[Collector] = ()) -> bool:
    """Serve this process's registry (plus `collectors`) on http://bind:port/metrics.

    Port 0 turns it off. A port already taken (two workers on one host with the same setting)
    costs this process its metrics, not its work: it logs a warning and goes on.
    """
    if not port:
        return False
    for collector in collectors:
        REGISTRY.register(collector)
    try:
        start_http_server(port, addr=bind)
    except OSError as e:
        logger.warning("metrics: cannot listen on %s:%d (%s); serving no metrics", bind, port, e)
        return False
    logger.info("metrics on http://%s:%d/metrics", bind, port)
    return True


# -- what a worker process reads from itself at scrape time


_Family = CounterMetricFamily | GaugeMetricFamily


def labelled_families(specs: Iterable[tuple[str, str, str, list[str]]]) -> dict[str, _Family]:
    families: dict[str, _Family] = {}
    for kind, name, doc, labels in specs:
        cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
        families[name] = cls(name, doc, labels=labels)
    return families


_WORKER_SPECS = [
    ("gauge", "postroom_worker_info", "This worker process (value 1)", ["name", "route", "models"]),
    ("gauge", "postroom_worker_shards_in_flight", "Shards this worker is working", ["route"]),
    ("gauge", "postroom_engine_inflight_requests", "Requests in the engine", ["model"]),
    ("gauge", "postroom_engine_max_inflight_requests", "Admission limit", ["model"]),
    ("gauge", "postroom_engine_max_num_seqs", "The engine's batch size (max_num_seqs)", ["model"]),
    (
        "gauge",
        "postroom_engine_batch_occupancy_ratio",
        "Requests in the engine over max_num_seqs, capped at 1 (beyond, they wait in vLLM)",
        ["model"],
    ),
    ("counter", "postroom_engine_requests", "Requests the engine finished", ["model"]),
    ("counter", "postroom_engine_prompt_tokens", "Prompt tokens sent to the engine", ["model"]),
    (
        "counter",
        "postroom_engine_cached_prompt_tokens",
        "Prompt tokens served from the prefix cache (hit rate: over prompt tokens)",
        ["model"],
    ),
]


class WorkerCollector(Collector):
    """Engine and worker gauges, read from the running process at every scrape.

    `snapshot()` returns `{name, route, models, shards_in_flight, engines: {alias: {inflight,
    max_inflight, max_num_seqs, requests, prompt_tokens, cached_tokens}}}`.
    """

    def __init__(self, snapshot: Callable[[], dict[str, Any]] | None = None) -> None:
        self.snapshot = snapshot

    def describe(self) -> Iterable[Metric]:
        return list(labelled_families(_WORKER_SPECS).values())

    def collect(self) -> Iterable[Metric]:
        families = labelled_families(_WORKER_SPECS)
        if self.snapshot is None:
            return list(families.values())
        snap = self.snapshot()
        route = str(snap["route"])
        families["postroom_worker_info"].add_metric(
            [str(snap["name"]), route, ",".join(snap["models"])], 1
        )
        families["postroom_worker_shards_in_flight"].add_metric([route], snap["shards_in_flight"])
        for alias, e in snap["engines"].items():
            values = {
                "postroom_engine_inflight_requests": e["inflight"],
                "postroom_engine_max_inflight_requests": e["max_inflight"],
                "postroom_engine_max_num_seqs": e["max_num_seqs"],
                "postroom_engine_batch_occupancy_ratio": min(e["inflight"], e["max_num_seqs"])
                / max(e["max_num_seqs"], 1),
                "postroom_engine_requests": e["requests"],
                "postroom_engine_prompt_tokens": e["prompt_tokens"],
                "postroom_engine_cached_prompt_tokens": e["cached_tokens"],
            }
            for name, value in values.items():
                families[name].add_metric([alias], value)
        return list(families.values())
