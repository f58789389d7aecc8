"""`postroom plan`'s arithmetic (postroom.plan) against a hand-checked example, and the CLI."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from postroom.plan import PlanInputs, make_plan, self_hosted_cost
from postroom_cli.main import app
from postroom_cli.plan_command import job_shares

# The hand-checked example:
#   managed, per document: (500 tokens x $0.15 + 5 tokens x $0.60) / 1e6 = $0.000078
#     on-demand: 10,000,000 x 0.000078 = $780.00;  batch: x 0.5 = $390.00
#   self-hosted: GPU work 10,000,000 / (1,000 docs/s x 3,600 x 0.5 busy) = 5.56 h, below one GPU
#     all month (730 h), so 730 h x $2.50 = $1,825.00; engineering 0.5 FTE x $200,000 / 12 =
#     $8,333.33; fixed $500.00; total $10,658.33
#   hybrid (10 % spilled, half of it as batches; 2 % escalated by the cascade): the GPUs keep
#     9,000,000 docs, still one GPU: $10,658.33; spill 1,000,000 x 0.000078 x (0.5 + 0.5 x 0.5)
#     = $58.50; cascade 10,000,000 x 0.02 x 0.000078 = $15.60; total $10,732.43
#   break-even vs on-demand: 10,658.33 / 0.000078 = 136,645,299 docs/month (one GPU carries up
#     to 730 x 3,600 x 1,000 x 0.5 = 1,314,000,000, so the flat part holds); vs batch:
#     10,658.33 / 0.000039 = 273,290,598
EXAMPLE = PlanInputs(
    docs_per_month=10_000_000,
    tokens_per_doc=500,
    docs_per_s_per_gpu=1000,
    gpu_price_per_hour=2.50,
    fte=0.5,
    fte_yearly_cost=200_000,
    fixed_per_month=500,
    price_input_per_mtok=0.15,
    price_output_per_mtok=0.60,
    batch_discount=0.5,
    answer_tokens=5,
    gpu_utilization=0.5,
    min_gpus=1,
    spill_share=0.1,
    spill_batch_share=0.5,
    cascade_share=0.02,
)


def test_plan_reproduces_the_hand_checked_example() -> None:
    plan = make_plan(EXAMPLE)

    assert plan.managed_per_doc == pytest.approx(0.000078)
    assert plan.managed_on_demand == pytest.approx(780.00)
    assert plan.managed_batch == pytest.approx(390.00)
    assert plan.gpu_hours == pytest.approx(730)
    assert plan.self_hosted_gpu == pytest.approx(1825.00)
    assert plan.self_hosted_engineering == pytest.approx(8333.33, abs=0.01)
    assert plan.self_hosted == pytest.approx(10658.33, abs=0.01)
    assert plan.hybrid == pytest.approx(10732.43, abs=0.01)
    assert plan.break_even_on_demand == pytest.approx(136_645_299, abs=1)
    assert plan.break_even_batch == pytest.approx(273_290_598, abs=1)
    assert plan.recommendation.startswith("Use the managed API")
    assert "136,645,299 docs/month" in plan.recommendation


def test_break_even_rises_with_the_engineering_cost() -> None:
    cheap = make_plan(EXAMPLE).break_even_on_demand
    dear = make_plan(replace(EXAMPLE, fte_yearly_cost=300_000)).break_even_on_demand
    more = make_plan(replace(EXAMPLE, fte=1.0)).break_even_on_demand

    assert cheap is not None
    assert dear is not None
    assert more is not None
    assert cheap < dear < more
    # 0.5 FTE at $300,000: (1,825 + 12,500 + 500) / 0.000078 = 190,064,103
    assert dear == pytest.approx(190_064_103, abs=1)


def test_break_even_past_the_first_gpu_and_self_hosting_past_it() -> None:
    # A slow GPU (10 docs/s, always busy) carries 26,280,000 docs a month: the break-even lies on
    # the rising part, where self-hosting and the managed API cost the same.
    slow = replace(EXAMPLE, docs_per_s_per_gpu=10, gpu_utilization=1.0)
    even = make_plan(slow).break_even_on_demand
    assert even is not None
    assert even > 26_280_000
    assert self_hosted_cost(slow, even) == pytest.approx(even * 0.000078)

    big = make_plan(replace(EXAMPLE, docs_per_month=1_000_000_000))
    assert big.self_hosted < big.managed_on_demand
    assert big.recommendation.startswith("Self-host")
    # A GPU dearer per document than the API never pays.
    assert make_plan(replace(slow, gpu_price_per_hour=10.0)).break_even_on_demand is None


def test_plan_rejects_shares_outside_zero_to_one() -> None:
    with pytest.raises(ValueError, match="spill_share"):
        replace(EXAMPLE, spill_share=1.5)


def test_plan_command_json_and_png(tmp_path: Path) -> None:
    png = tmp_path / "plan.png"
    result = CliRunner().invoke(
        app,
        [
            "plan",
            "--docs-per-month",
            "10000000",
            "--tokens-per-doc",
            "500",
            "--docs-per-s",
            "1000",
            "--gpu-price-per-hour",
            "2.5",
            "--spill-share",
            "0.1",
            "--json",
            "--png",
            str(png),
        ],
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["self_hosted"] == pytest.approx(10658.33, abs=0.01)
    assert out["inputs"]["spill_share"] == 0.1
    assert png.read_bytes().startswith(b"\x89PNG")


def test_plan_command_reads_the_bench_rate(tmp_path: Path) -> None:
    bench = tmp_path / "gpu.json"
    bench.write_text(json.dumps({"shapes": {"0.5b": {"modes": {"b": {"docs_per_s": 1000.0}}}}}))
    result = CliRunner().invoke(app, ["plan", "--docs-per-month", "1000000", "--bench", str(bench)])
    assert result.exit_code == 0, result.output
    assert "1,000.0 docs/s" in result.output
    missing = CliRunner().invoke(
        app, ["plan", "--docs-per-month", "1", "--bench", str(bench), "--shape", "7b"]
    )
    assert missing.exit_code == 2
    assert "shapes: 0.5b" in missing.output


def test_shares_measured_on_a_job() -> None:
    job = {
        "id": "j",
        "counts": {"total": 1000},
        "spend": {
            "gpu": {"docs": 800},
            "spill": {"docs": 150},
            "batch": {"docs": 50},
            "total": 1.0,
        },
        "cascade": {"escalated": 30},
    }
    assert job_shares(job) == (0.2, 0.25, 0.03)
