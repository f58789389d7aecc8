"""Money: a job's estimate before it starts and its spend per route, from settings' prices."""

from __future__ import annotations

from typing import Any

from postroom.settings import Settings

# Tokens per character of English text, for estimates before anything is tokenised.
TOKENS_PER_CHAR = 0.25
ANSWER_TOKENS = 5


def spill_cost(settings: Settings, *, tokens_in: float, tokens_out: float) -> float:
    return (
        tokens_in * settings.spill_price_input_per_mtok
        + tokens_out * settings.spill_price_output_per_mtok
    ) / 1e6


def batch_cost(settings: Settings, *, tokens_in: float, tokens_out: float) -> float:
    """The managed API through its batch endpoint (patient spill): the discounted price."""
    return spill_cost(settings, tokens_in=tokens_in, tokens_out=tokens_out) * (
        settings.spill_batch_discount
    )


def gpu_cost(settings: Settings, *, tokens_in: float) -> float:
    """GPU time the prompt tokens take at the measured throughput, at the price per hour."""
    return tokens_in / settings.gpu_tokens_per_second * settings.gpu_price_per_hour / 3600


def estimate(settings: Settings, *, docs: int, chars: int, prompt_chars: int) -> dict[str, Any]:
    """Tokens and cost of a job on each route, before it starts."""
    tokens_in = int((chars + docs * prompt_chars) * TOKENS_PER_CHAR)
    tokens_out = docs * ANSWER_TOKENS
    return {
        "docs": docs,
        "tokens_in": tokens_in,
        "tokens_per_doc": round(tokens_in / docs, 1) if docs else 0.0,
        "gpu": {"cost": round(gpu_cost(settings, tokens_in=tokens_in), 6)},
        "spill": {
            "cost": round(spill_cost(settings, tokens_in=tokens_in, tokens_out=tokens_out), 6)
        },
    }


def route_cost(settings: Settings, route: str, *, tokens_in: float, tokens_out: float) -> float:
    if route == "spill":
        return spill_cost(settings, tokens_in=tokens_in, tokens_out=tokens_out)
    if route == "batch":
        return batch_cost(settings, tokens_in=tokens_in, tokens_out=tokens_out)
    return gpu_cost(settings, tokens_in=tokens_in)


def spend(
    settings: Settings, by_route: dict[str, dict[str, int]], *, docs: int | None = None
) -> dict[str, Any]:
    """`by_route[route] = {docs, tokens_in, tokens_out}` → cost per route, total, $/1,000 docs.

    `docs` is the number of documents when a document may count on two routes (a cascade
    escalation is work on both); by default the routes' documents are summed."""
    out: dict[str, Any] = {}
    total = 0.0
    counted = 0
    for route, row in sorted(by_route.items()):
        cost = route_cost(settings, route, tokens_in=row["tokens_in"], tokens_out=row["tokens_out"])
        out[route] = {**row, "cost": round(cost, 6)}
        total += cost
        counted += row["docs"]
    docs = counted if docs is None else docs
    out["total"] = round(total, 6)
    out["per_1000_docs"] = round(total / docs * 1000, 6) if docs else None
    return out
