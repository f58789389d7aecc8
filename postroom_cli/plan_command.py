"""`postroom plan`: managed API vs self-hosted GPUs per month, engineering counted
(postroom.plan does the arithmetic)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from postroom.costs import ANSWER_TOKENS
from postroom.plan import Plan, PlanInputs, cost_curve, make_plan
from postroom.settings import get_settings
from postroom_cli.terminal import console, err

ROOT = Path(__file__).resolve().parents[1]
GPU_BENCH = ROOT / "bench" / "results" / "gpu.json"


def bench_rate(path: Path, shape: str) -> float:
    """docs/s per GPU measured by bench/gpu on Postroom's own path (mode b) for `shape`."""
    data = json.loads(path.read_text())
    try:
        return float(data["shapes"][shape]["modes"]["b"]["docs_per_s"])
    except KeyError as e:
        shapes = ", ".join(data.get("shapes") or {}) or "none"
        raise ValueError(f"{path} has no mode-b rate for shape {shape!r} (shapes: {shapes})") from e


def live_rate(status: dict[str, Any]) -> float:
    """docs/s per live GPU worker over the last minute, from `GET /v1/status` (admin key)."""
    rates = [
        float(w["docs_per_second"])
        for w in status.get("workers", [])
        if w.get("route") == "gpu" and w.get("alive")
    ]
    if not rates or not sum(rates):
        raise ValueError(
            "the deployment reports no busy live GPU worker (needs an admin key and a worker "
            "that finished documents in the last minute); pass --docs-per-s instead"
        )
    return sum(rates) / len(rates)


def job_shares(job: dict[str, Any]) -> tuple[float, float, float]:
    """(spill share, batch share of the spilled, cascade share) measured on a finished job."""
    spend = job.get("spend") or {}
    docs = {route: int(row.get("docs", 0)) for route, row in spend.items() if isinstance(row, dict)}
    total = int((job.get("counts") or {}).get("total") or 0) or sum(docs.values())
    batch = docs.get("batch", 0)  # patient spill, through the batch endpoint
    spilled = docs.get("spill", 0) + batch
    cascade = job.get("cascade") or {}
    escalated = int(cascade.get("escalated") or 0) if isinstance(cascade, dict) else 0
    if not total:
        raise ValueError(f"job {job.get('id')} has no documents to measure")
    return spilled / total, (batch / spilled if spilled else 0.0), escalated / total


def plan(
    docs_per_month: Annotated[float, typer.Option(help="documents classified per month")],
    tokens_per_doc: Annotated[float, typer.Option(help="prompt tokens per document")] = 600.0,
    docs_per_s: Annotated[
        float | None, typer.Option(help="docs/s one GPU sustains (default: --bench)")
    ] = None,
    bench: Annotated[Path, typer.Option(help="bench/gpu results to take docs/s from")] = GPU_BENCH,
    shape: Annotated[str, typer.Option(help="model shape in --bench")] = "0.5b",
    live: Annotated[
        bool, typer.Option(help="docs/s from the live deployment's GPU workers (admin key)")
    ] = False,
    gpu_price_per_hour: Annotated[
        float | None, typer.Option(help="[POSTROOM_GPU_PRICE_PER_HOUR]")
    ] = None,
    gpu_utilization: Annotated[float, typer.Option(help="share of paid GPU hours busy")] = 0.5,
    min_gpus: Annotated[int, typer.Option(help="GPUs kept on all month")] = 1,
    fte: Annotated[float, typer.Option(help="engineers needed to run it (FTE)")] = 0.5,
    fte_yearly_cost: Annotated[float, typer.Option(help="$ per FTE per year, loaded")] = 200_000.0,
    fixed_per_month: Annotated[
        float, typer.Option(help="$ per month of fixed infrastructure (DB, S3, monitoring)")
    ] = 500.0,
    spill_share: Annotated[float, typer.Option(help="hybrid: share of docs spilled")] = 0.0,
    spill_batch_share: Annotated[
        float, typer.Option(help="hybrid: share of the spilled docs sent as batches")
    ] = 0.0,
    cascade_share: Annotated[float, typer.Option(help="hybrid: share of docs escalated")] = 0.0,
    from_job: Annotated[
        str | None, typer.Option(help="hybrid shares measured on this job (overrides the three)")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    png: Annotated[Path | None, typer.Option(help="write a cost-vs-volume plot here")] = None,
    api_url: Annotated[str | None, typer.Option(help="API base URL [POSTROOM_API_URL]")] = None,
    key: Annotated[str | None, typer.Option("--key", help="API key [POSTROOM_API_KEY]")] = None,
) -> None:
    """Monthly cost of the managed API (on demand, batch), self-hosting (GPU + engineering +
    fixed) and hybrid, the break-even volume, and which to use."""
    settings = get_settings(resolve_services=False)
    try:
        if from_job or live:
            from postroom_cli.job_commands import _client

            client = _client(api_url, key)
            if from_job:
                spill_share, spill_batch_share, cascade_share = job_shares(client.job(from_job))
            if live and docs_per_s is None:
                docs_per_s = live_rate(client.status())
        if docs_per_s is None:
            docs_per_s = bench_rate(bench, shape)
        inputs = PlanInputs(
            docs_per_month=docs_per_month,
            tokens_per_doc=tokens_per_doc,
            docs_per_s_per_gpu=docs_per_s,
            gpu_price_per_hour=(
                settings.gpu_price_per_hour if gpu_price_per_hour is None else gpu_price_per_hour
            ),
            fte=fte,
            fte_yearly_cost=fte_yearly_cost,
            fixed_per_month=fixed_per_month,
            price_input_per_mtok=settings.spill_price_input_per_mtok,
            price_output_per_mtok=settings.spill_price_output_per_mtok,
            batch_discount=settings.spill_batch_discount,
            answer_tokens=ANSWER_TOKENS,
            gpu_utilization=gpu_utilization,
            min_gpus=min_gpus,
            spill_share=spill_share,
            spill_batch_share=spill_batch_share,
            cascade_share=cascade_share,
        )
    except (ValueError, OSError) as e:
        err.print(f"[red]{e}[/red]")
        raise typer.Exit(2) from e
    result = make_plan(inputs)
    if png is not None:
        draw(result, png)
    if as_json:
        console.print_json(json.dumps(result.as_dict()))
        return
    print_plan(result)
    if png is not None:
        console.print(f"plot: {png}")


def _volume(value: float | None) -> str:
    return "never" if value is None else f"{value:,.0f} docs/month"


def print_plan(result: Plan) -> None:
    i = result.inputs
    console.print(
        f"{i.docs_per_month:,.0f} docs/month x {i.tokens_per_doc:,.0f} tokens; one GPU: "
        f"{i.docs_per_s_per_gpu:,.1f} docs/s at ${i.gpu_price_per_hour:.2f}/h, "
        f"{i.gpu_utilization:.0%} busy; {i.fte:g} FTE at ${i.fte_yearly_cost:,.0f}/year"
    )
    table = Table("option", "$/month", "how")
    table.add_row(
        "managed on-demand",
        f"{result.managed_on_demand:,.2f}",
        f"${result.managed_per_doc * 1000:.4f} per 1,000 docs",
    )
    table.add_row(
        "managed batch", f"{result.managed_batch:,.2f}", f"x {i.batch_discount:g}, within a day"
    )
    table.add_row(
        "self-hosted",
        f"{result.self_hosted:,.2f}",
        f"GPU {result.self_hosted_gpu:,.2f} ({result.gpu_hours:,.0f} h, {result.gpus} GPU) + "
        f"engineering {result.self_hosted_engineering:,.2f} + "
        f"fixed {result.self_hosted_fixed:,.2f}",
    )
    table.add_row(
        "hybrid",
        f"{result.hybrid:,.2f}",
        f"spill {i.spill_share:.1%} ({i.spill_batch_share:.0%} as batches), "
        f"cascade {i.cascade_share:.1%}",
    )
    console.print(table)
    console.print(
        f"break-even: {_volume(result.break_even_on_demand)} vs on-demand, "
        f"{_volume(result.break_even_batch)} vs batch"
    )
    console.print(result.recommendation)


def draw(result: Plan, path: Path) -> None:
    """Monthly cost against volume (log-log), the plan's volume and break-even marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = max(result.inputs.docs_per_month, result.break_even_on_demand or 0.0) * 10
    volumes = [top * 10 ** (-4 + 4 * k / 80) for k in range(81)]
    curves = cost_curve(result.inputs, volumes)
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, costs in curves.items():
        ax.plot(volumes, costs, label=name)
    ax.axvline(result.inputs.docs_per_month, color="grey", linestyle=":", label="this plan")
    if result.break_even_on_demand is not None:
        ax.axvline(result.break_even_on_demand, color="black", linestyle="--", label="break-even")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("documents per month")
    ax.set_ylabel("$ per month")
    ax.set_title("postroom plan: managed API vs self-hosted, engineering counted")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
