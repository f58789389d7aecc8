"""The cost of owning GPUs against a managed API, per month: the pure calculation behind
`postroom plan`.

Self-hosting costs GPU hours, the engineering time to run them and fixed infrastructure; a managed
API costs tokens. Following the rule of thumb the project started from: use a managed API until
its monthly bill justifies self-hosting *counting engineering time* (a self-hosted ROI without it
is wrong).

- managed: documents x (tokens in x input price + tokens out x output price); the batch endpoint
  at `batch_discount` of that.
- self-hosted: GPU hours = documents / (docs/s per GPU x 3,600 x utilisation), never fewer than
  `min_gpus` GPUs on all month (730 h); plus FTE x yearly cost / 12, plus fixed infrastructure.
- hybrid: self-hosted for the documents the GPUs keep, the managed API for the spilled share (the
  batch-endpoint part of it at the batch price), and a cascade share escalated to the managed API
  on top (those documents were also classified on the GPUs first).
- break-even: the monthly volume where self-hosting costs what the managed API does (on-demand and
  batch); None when the GPU's marginal cost per document is not below the managed price.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

HOURS_PER_MONTH = 730.0


@dataclass(frozen=True)
class PlanInputs:
    docs_per_month: float
    tokens_per_doc: float
    docs_per_s_per_gpu: float
    gpu_price_per_hour: float
    fte: float
    fte_yearly_cost: float
    fixed_per_month: float
    price_input_per_mtok: float
    price_output_per_mtok: float
    batch_discount: float = 0.5
    answer_tokens: float = 5.0
    gpu_utilization: float = 0.5
    min_gpus: int = 1
    spill_share: float = 0.0
    spill_batch_share: float = 0.0  # of the spilled documents, the part sent as batches
    cascade_share: float = 0.0

    def __post_init__(self) -> None:
        for name in ("docs_per_s_per_gpu", "gpu_utilization"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be above 0")
        for name in ("spill_share", "spill_batch_share", "cascade_share", "gpu_utilization"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be between 0 and 1")


@dataclass(frozen=True)
class Plan:
    inputs: PlanInputs
    managed_per_doc: float
    managed_on_demand: float
    managed_batch: float
    gpu_hours: float
    gpus: int
    self_hosted_gpu: float
    self_hosted_engineering: float
    self_hosted_fixed: float
    self_hosted: float
    hybrid: float
    break_even_on_demand: float | None
    break_even_batch: float | None
    recommendation: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def managed_per_doc(inputs: PlanInputs) -> float:
    return (
        inputs.tokens_per_doc * inputs.price_input_per_mtok
        + inputs.answer_tokens * inputs.price_output_per_mtok
    ) / 1e6


def gpu_hours(inputs: PlanInputs, docs: float) -> float:
    """GPU hours paid for in a month: the work at the utilisation, at least `min_gpus` all month."""
    work = docs / (inputs.docs_per_s_per_gpu * 3600 * inputs.gpu_utilization)
    return max(work, inputs.min_gpus * HOURS_PER_MONTH)


def self_hosted_cost(inputs: PlanInputs, docs: float) -> float:
    return (
        gpu_hours(inputs, docs) * inputs.gpu_price_per_hour
        + _engineering(inputs)
        + inputs.fixed_per_month
    )


def break_even(inputs: PlanInputs, per_doc: float) -> float | None:
    """The monthly documents where self-hosting costs `per_doc` x documents (the cost lines are
    piecewise linear: flat while the minimum GPUs suffice, then rising per GPU hour)."""
    floor_gpu = inputs.min_gpus * HOURS_PER_MONTH * inputs.gpu_price_per_hour
    overhead = _engineering(inputs) + inputs.fixed_per_month
    if per_doc <= 0:
        return None
    flat = (overhead + floor_gpu) / per_doc
    capacity = inputs.min_gpus * HOURS_PER_MONTH * inputs.docs_per_s_per_gpu * 3600
    if flat <= capacity * inputs.gpu_utilization:
        return flat
    gpu_per_doc = inputs.gpu_price_per_hour / (
        inputs.docs_per_s_per_gpu * 3600 * inputs.gpu_utilization
    )
    if gpu_per_doc >= per_doc:
        return None
    return overhead / (per_doc - gpu_per_doc)


def make_plan(inputs: PlanInputs) -> Plan:
    docs = inputs.docs_per_month
    per_doc = managed_per_doc(inputs)
    on_demand = docs * per_doc
    batch = on_demand * inputs.batch_discount
    hours = gpu_hours(inputs, docs)
    self_gpu = hours * inputs.gpu_price_per_hour
    self_total = self_gpu + _engineering(inputs) + inputs.fixed_per_month
    spilled = docs * inputs.spill_share
    spill_price = per_doc * (
        1 - inputs.spill_batch_share + inputs.spill_batch_share * inputs.batch_discount
    )
    hybrid = (
        self_hosted_cost(inputs, docs - spilled)
        + spilled * spill_price
        + docs * inputs.cascade_share * per_doc
    )
    even_on_demand = break_even(inputs, per_doc)
    even_batch = break_even(inputs, per_doc * inputs.batch_discount)
    return Plan(
        inputs=inputs,
        managed_per_doc=per_doc,
        managed_on_demand=on_demand,
        managed_batch=batch,
        gpu_hours=hours,
        gpus=max(inputs.min_gpus, int(-(-hours // HOURS_PER_MONTH))),
        self_hosted_gpu=self_gpu,
        self_hosted_engineering=_engineering(inputs),
        self_hosted_fixed=inputs.fixed_per_month,
        self_hosted=self_total,
        hybrid=hybrid,
        break_even_on_demand=even_on_demand,
        break_even_batch=even_batch,
        recommendation=recommend(
            docs=docs,
            on_demand=on_demand,
            batch=batch,
            self_hosted=self_total,
            hybrid=hybrid,
            even=even_on_demand,
        ),
    )


def recommend(
    *,
    docs: float,
    on_demand: float,
    batch: float,
    self_hosted: float,
    hybrid: float,
    even: float | None,
) -> str:
    """One line: a managed API until its monthly bill passes self-hosting's, engineering counted."""
    if self_hosted >= on_demand:
        until = (
            f"self-hosting pays from {even:,.0f} docs/month"
            if even is not None
            else "self-hosting never pays at these prices"
        )
        return (
            f"Use the managed API: ${on_demand:,.0f}/month on demand (${batch:,.0f} through its "
            f"batch endpoint for work that can wait a day) vs ${self_hosted:,.0f} self-hosted "
            f"with engineering; {until}."
        )
    best, name = (hybrid, "hybrid") if hybrid < self_hosted else (self_hosted, "self-hosted")
    note = (
        f" (the batch endpoint, ${batch:,.0f}, is cheaper still for work that can wait a day)"
        if batch < best
        else ""
    )
    return (
        f"Self-host: ${best:,.0f}/month {name} vs ${on_demand:,.0f} on the managed API, "
        f"engineering counted; it pays from {even:,.0f} docs/month{note}."
        if even is not None
        else f"Self-host: ${best:,.0f}/month {name} vs ${on_demand:,.0f} on the managed API{note}."
    )


def cost_curve(inputs: PlanInputs, volumes: list[float]) -> dict[str, list[float]]:
    """Each option's monthly cost at each volume (for the plot)."""
    curves: dict[str, list[float]] = {"managed on-demand": [], "managed batch": []}
    curves.update({"self-hosted": [], "hybrid": []})
    for docs in volumes:
        plan = make_plan(replace(inputs, docs_per_month=docs))
        curves["managed on-demand"].append(plan.managed_on_demand)
        curves["managed batch"].append(plan.managed_batch)
        curves["self-hosted"].append(plan.self_hosted)
        curves["hybrid"].append(plan.hybrid)
    return curves


def _engineering(inputs: PlanInputs) -> float:
    return inputs.fte * inputs.fte_yearly_cost / 12
