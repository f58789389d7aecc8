"""$ per million documents: a GPU at its price per hour and throughput vs the managed API.

    .venv/bin/python bench/cost.py                          # settings' prices, H100 numbers
    .venv/bin/python bench/cost.py --tokens-per-doc 600 --gpu-tokens-per-s 186000

Throughputs default to the raw-vLLM H100 measurements of shared/gpu/README.md (0.5B and 1.5B shapes,
one-step scoring, shared prefix) and, where it exists, bench/results/gpu.json (Postroom's own path).
Prints a table and writes bench/results/cost.json.
"""

from __future__ import annotations

import json
from pathlib import Path

from report import bench_parser, parse_bench_args, write_results

from postroom.costs import ANSWER_TOKENS
from postroom.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
# docs/s on one H100, raw vLLM (shared/gpu/README.md: 200 to 600-token docs, shared prefix)
H100 = {"Qwen2.5-0.5B shape": 892.0, "Qwen2.5-1.5B shape": 443.0}


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--tokens-per-doc", type=float, default=600.0)
    args = parse_bench_args(parser, "cost")
    settings = Settings()
    rates = dict(H100)
    measured = ROOT / "bench" / "results" / "gpu.json"
    if measured.exists():
        data = json.loads(measured.read_text())
        for name, shape in (data.get("shapes") or {}).items():
            mode = (shape.get("modes") or {}).get("b")
            if mode:
                rates[f"{name} shape, Postroom's path (bench/gpu)"] = float(mode["docs_per_s"])
    million = 1_000_000
    managed = (
        million * args.tokens_per_doc * settings.spill_price_input_per_mtok
        + million * ANSWER_TOKENS * settings.spill_price_output_per_mtok
    ) / 1e6
    rows = [
        {
            "route": f"GPU, {name}",
            "docs_per_s": rate,
            "hours_per_million": round(million / rate / 3600, 3),
            "dollars_per_million": round(million / rate / 3600 * settings.gpu_price_per_hour, 2),
        }
        for name, rate in rates.items()
    ]
    rows.append(
        {
            "route": "managed API",
            "docs_per_s": None,
            "hours_per_million": None,
            "dollars_per_million": round(managed, 2),
        }
    )
    print(
        f"prices: GPU ${settings.gpu_price_per_hour}/h; "
        f"managed ${settings.spill_price_input_per_mtok}/M input + "
        f"${settings.spill_price_output_per_mtok}/M output tokens; "
        f"{args.tokens_per_doc:.0f} tokens/doc"
    )
    print(f"{'route':<48} {'docs/s':>8} {'h / 1M':>8} {'$ / 1M docs':>12} {'vs managed':>11}")
    for row in rows:
        rate = f"{row['docs_per_s']:,.0f}" if row["docs_per_s"] else "-"
        hours = f"{row['hours_per_million']:.2f}" if row["hours_per_million"] else "-"
        ratio = row["dollars_per_million"] / managed
        print(
            f"{row['route']:<48} {rate:>8} {hours:>8} {row['dollars_per_million']:>12,.2f} "
            f"{ratio:>10.1%}"
        )
    body = {
        "tokens_per_doc": args.tokens_per_doc,
        "gpu_price_per_hour": settings.gpu_price_per_hour,
        "rows": rows,
    }
    write_results(args.out, body, machine=False)


if __name__ == "__main__":
    main()
